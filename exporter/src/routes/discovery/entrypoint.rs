//! Which Flask application a server process runs, from its command line,
//! environment and working directory, as its server would find it:
//! gunicorn `module:app` or `module:create_app()` (with `--chdir`,
//! `--pythonpath`, or a config file's `wsgi_app`), `flask run` with
//! `FLASK_APP` or `--app` (also as `python -m flask`), `python app.py`,
//! uwsgi `--module`/`--wsgi-file`, and `waitress-serve`.

use std::path::{Path, PathBuf};

/// Where the application object is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AppSource {
    /// A dotted module name, resolved against the search path.
    Module(String),
    /// The first of these modules that exists (`flask run`'s default:
    /// `wsgi`, then `app`).
    FirstModule(Vec<String>),
    /// A script file (`python app.py`, uwsgi `--wsgi-file`).
    File(PathBuf),
}

/// How to get the application from its module.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AppObject {
    /// A module-level variable (`app`).
    Variable(String),
    /// A factory called with no arguments (`create_app()`).
    Factory(String),
    /// Not named: Flask's own lookup (`app`, `application`, then a
    /// `create_app`/`make_app` factory, then the module's one Flask instance).
    Default,
}

/// The servers an entrypoint can name.
const SERVERS: [&str; 5] = ["gunicorn", "flask run", "python", "uwsgi", "waitress-serve"];

/// The application a server process runs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Entrypoint {
    /// What ran it, for `/debug/routes` (`gunicorn`, `flask run`, ...).
    pub server: &'static str,
    pub source: AppSource,
    pub object: AppObject,
    /// Where modules are looked up first, before the interpreter's own
    /// paths: the working directory (or `--chdir`), then `PYTHONPATH` and
    /// `--pythonpath` entries. Paths inside the process's root.
    pub search_path: Vec<PathBuf>,
    /// The interpreter's site-packages, where an app installed as a package
    /// is found: searched only for the entry module's own top-level
    /// package, never for the libraries beside it.
    pub site_packages: Vec<PathBuf>,
}

/// An [`Entrypoint`] as a route-discovery helper's answer holds it: its
/// server must be one of [`SERVERS`].
#[derive(serde::Deserialize)]
struct EntrypointAnswer {
    server: String,
    source: AppSource,
    object: AppObject,
    search_path: Vec<PathBuf>,
    site_packages: Vec<PathBuf>,
}

impl<'de> serde::Deserialize<'de> for Entrypoint {
    fn deserialize<D: serde::Deserializer<'de>>(answer: D) -> Result<Self, D::Error> {
        let answer = EntrypointAnswer::deserialize(answer)?;
        let server = SERVERS
            .iter()
            .find(|known| **known == answer.server)
            .ok_or_else(|| {
                serde::de::Error::custom(format!("unknown server {:?}", answer.server))
            })?;
        Ok(Entrypoint {
            server,
            source: answer.source,
            object: answer.object,
            search_path: answer.search_path,
            site_packages: answer.site_packages,
        })
    }
}

/// Why no entrypoint was found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntrypointError {
    #[error("not a Python web server this agent knows how to read: {0}")]
    UnknownServer(String),
    #[error("{server} was started without an application to serve")]
    NoApplication { server: &'static str },
    #[error("the gunicorn config file {0} names no wsgi_app")]
    ConfigWithoutApp(String),
}

/// What a process's `/proc` says about how it was started.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ProcessStart {
    pub argv: Vec<String>,
    pub environment: Vec<(String, String)>,
    /// Its working directory, inside its root.
    pub cwd: PathBuf,
    /// The interpreter binary (`/proc/<pid>/exe`), inside its root.
    pub executable: Option<PathBuf>,
}

impl ProcessStart {
    fn env(&self, name: &str) -> Option<&str> {
        self.environment
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Finds the application of a process; `read_config` reads a gunicorn
/// config file (a path inside the process's root) for its `wsgi_app`.
pub fn find(
    start: &ProcessStart,
    read_config: &dyn Fn(&Path) -> Option<String>,
) -> Result<Entrypoint, EntrypointError> {
    // gunicorn with setproctitle names itself "gunicorn: master [shop:app]".
    let retitled = retitled_gunicorn(&start.argv);
    let argv = retitled.as_deref().unwrap_or(&start.argv);
    let (program, arguments) = program_and_arguments(argv)
        .ok_or_else(|| EntrypointError::UnknownServer(start.argv.join(" ")))?;
    let mut search_path = vec![start.cwd.clone()];
    if let Some(paths) = start.env("PYTHONPATH") {
        search_path.extend(
            paths
                .split(':')
                .filter(|p| !p.is_empty())
                .map(|p| start.cwd.join(p)),
        );
    }
    let entrypoint = match program.as_str() {
        "gunicorn" => gunicorn(arguments, start, search_path, read_config)?,
        "flask" => flask_run(arguments, start, search_path)?,
        "uwsgi" => uwsgi(arguments, start, search_path)?,
        "waitress-serve" => waitress(arguments, search_path)?,
        script if script.ends_with(".py") => Entrypoint {
            server: "python",
            source: AppSource::File(start.cwd.join(script)),
            object: AppObject::Default,
            search_path: with_script_dir(search_path, &start.cwd.join(script)),
            site_packages: Vec::new(),
        },
        other => return Err(EntrypointError::UnknownServer(other.to_owned())),
    };
    Ok(entrypoint)
}

/// The site-packages directories the process's interpreter may import
/// from, as CPython's `site` builds them from its prefix: a venv's (the
/// one `VIRTUAL_ENV` names, or the one whose `bin/` the server was started
/// from, found on `PATH` when started by name), then the interpreter's own
/// prefix (`/usr/local` in the python images, `/usr` with Debian's
/// `dist-packages`), then the user's. Candidates only: a harvest looks a
/// module up in those that exist.
pub fn site_packages(start: &ProcessStart, is_file: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = Vec::new();
    let mut add_prefix_of = |program: &Path| {
        // `<prefix>/bin/<program>`
        let prefix = program.parent().filter(|bin| bin.ends_with("bin"));
        if let Some(prefix) = prefix.and_then(Path::parent)
            && !prefixes.iter().any(|known| known == prefix)
        {
            prefixes.push(prefix.to_path_buf());
        }
    };
    if let Some(venv) = start.env("VIRTUAL_ENV") {
        add_prefix_of(&Path::new(venv).join("bin/python"));
    }
    // The program and, for `python /venv/bin/gunicorn`, its script.
    let programs = start.argv.iter().take(2).filter(|argument| {
        !argument.starts_with('-') && (argument.contains('/') || !argument.ends_with(".py"))
    });
    for program in programs {
        if program.contains('/') {
            add_prefix_of(&start.cwd.join(program));
        } else if let Some(found) = start
            .env("PATH")
            .unwrap_or_default()
            .split(':')
            .filter(|dir| dir.starts_with('/'))
            .map(|dir| Path::new(dir).join(program))
            .find(|candidate| is_file(candidate))
        {
            add_prefix_of(&found);
        }
    }
    if let Some(executable) = &start.executable {
        add_prefix_of(executable);
    }
    // `python3.13` → "3.13"; a build without a versioned name: the usual ones.
    let version = start
        .executable
        .as_deref()
        .and_then(Path::file_name)
        .and_then(|name| name.to_str()?.strip_prefix("python"))
        .filter(|version| version.contains('.'))
        .map(|version| version.trim_end_matches(|c: char| !c.is_ascii_digit()));
    let versions: Vec<String> = match version {
        Some(version) => vec![version.to_owned()],
        None => (8..=14).rev().map(|minor| format!("3.{minor}")).collect(),
    };
    let mut directories = Vec::new();
    for prefix in &prefixes {
        for version in &versions {
            directories.push(prefix.join(format!("lib/python{version}/site-packages")));
            directories.push(prefix.join(format!("local/lib/python{version}/dist-packages")));
        }
        directories.push(prefix.join("lib/python3/dist-packages"));
    }
    if let Some(home) = start.env("HOME") {
        for version in &versions {
            directories
                .push(Path::new(home).join(format!(".local/lib/python{version}/site-packages")));
        }
    }
    directories
}

/// `gunicorn: master [shop:app]` (or `worker`) as `gunicorn shop:app`.
fn retitled_gunicorn(argv: &[String]) -> Option<Vec<String>> {
    let title = argv.join(" ");
    let rest = title.strip_prefix("gunicorn: ")?;
    let application = rest.split_once('[')?.1.strip_suffix(']')?;
    Some(vec!["gunicorn".to_owned(), application.to_owned()])
}

/// The server's name and its arguments: `python -m gunicorn ...`,
/// `/venv/bin/gunicorn ...` and `python /venv/bin/gunicorn ...` are all
/// gunicorn; `python app.py` is the script.
fn program_and_arguments(argv: &[String]) -> Option<(String, &[String])> {
    let first = argv.first()?;
    let name = base_name(first);
    if !is_python(&name) {
        return Some((name, &argv[1..]));
    }
    let mut index = 1;
    while let Some(argument) = argv.get(index) {
        match argument.as_str() {
            "-m" => {
                let module = argv.get(index + 1)?;
                return Some((module.clone(), &argv[index + 2..]));
            }
            // Interpreter options that take a value.
            "-W" | "-X" => index += 2,
            option if option.starts_with('-') => index += 1,
            script => {
                let name = base_name(script);
                return Some(if name.ends_with(".py") {
                    (script.to_owned(), &argv[index + 1..])
                } else {
                    (name, &argv[index + 1..])
                });
            }
        }
    }
    None
}

fn base_name(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_owned()
}

fn is_python(name: &str) -> bool {
    name == "python"
        || name.strip_prefix("python").is_some_and(|version| {
            version
                .chars()
                .all(|c| c.is_ascii_digit() || c == '.' || c == 'd' || c == 'm')
        })
}

/// `module:object` (gunicorn, `flask --app`): the module and what to take
/// from it.
fn module_and_object(spec: &str) -> (String, AppObject) {
    let (module, object) = match spec.split_once(':') {
        Some((module, object)) => (module, Some(object.trim())),
        None => (spec, None),
    };
    let object = match object {
        None | Some("") => AppObject::Default,
        Some(call) if call.ends_with(')') => {
            AppObject::Factory(call.split('(').next().unwrap_or(call).trim().to_owned())
        }
        Some(name) => AppObject::Variable(name.to_owned()),
    };
    (module.trim().to_owned(), object)
}

/// An option's value, given as `--name value` or `--name=value` (or a
/// short `-x value`); returns it and how many arguments it took.
fn option_value<'a>(
    arguments: &'a [String],
    index: usize,
    names: &[&str],
) -> Option<(&'a str, usize)> {
    let argument = arguments.get(index)?;
    for name in names {
        if argument == name {
            return Some((arguments.get(index + 1)?.as_str(), 2));
        }
        if let Some(value) = argument
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
        {
            return Some((value, 1));
        }
    }
    None
}

/// gunicorn's options that take a value, so that their values are not
/// taken for the application.
const GUNICORN_VALUED: &[&str] = &[
    "-b",
    "--bind",
    "-w",
    "--workers",
    "-k",
    "--worker-class",
    "--threads",
    "-t",
    "--timeout",
    "--graceful-timeout",
    "--keep-alive",
    "--max-requests",
    "--max-requests-jitter",
    "--backlog",
    "--worker-connections",
    "--log-level",
    "--access-logfile",
    "--error-logfile",
    "--log-file",
    "--access-logformat",
    "-n",
    "--name",
    "-p",
    "--pid",
    "-u",
    "--user",
    "-g",
    "--group",
    "-m",
    "--umask",
    "--worker-tmp-dir",
    "-e",
    "--env",
    "--forwarded-allow-ips",
    "--limit-request-line",
    "--limit-request-fields",
    "--limit-request-field_size",
    "--certfile",
    "--keyfile",
    "--ca-certs",
    "--ssl-version",
    "--ciphers",
    "--statsd-host",
    "--statsd-prefix",
    "--dogstatsd-tags",
    "--log-config",
    "--log-syslog-to",
    "--log-syslog-prefix",
    "--log-syslog-facility",
    "--proxy-allow-from",
    "--paste",
    "--paster",
    "--capture-output",
    "--control-socket",
    "--reload-engine",
    "--reload-extra-file",
    "--worker-restart-delay",
];

fn gunicorn(
    arguments: &[String],
    start: &ProcessStart,
    mut search_path: Vec<PathBuf>,
    read_config: &dyn Fn(&Path) -> Option<String>,
) -> Result<Entrypoint, EntrypointError> {
    let mut application = None;
    let mut config = None;
    let mut chdir = None;
    let mut python_path = Vec::new();
    let mut index = 0;
    while index < arguments.len() {
        if let Some((value, taken)) = option_value(arguments, index, &["--chdir"]) {
            chdir = Some(start.cwd.join(value));
            index += taken;
        } else if let Some((value, taken)) = option_value(arguments, index, &["--pythonpath"]) {
            python_path.extend(value.split(',').map(str::to_owned));
            index += taken;
        } else if let Some((value, taken)) = option_value(arguments, index, &["-c", "--config"]) {
            config = Some(value.to_owned());
            index += taken;
        } else if let Some((_, taken)) = option_value(arguments, index, GUNICORN_VALUED) {
            index += taken;
        } else {
            let argument = &arguments[index];
            if !argument.starts_with('-') && application.is_none() {
                application = Some(argument.clone());
            }
            index += 1;
        }
    }
    if let Some(chdir) = &chdir {
        search_path[0] = chdir.clone();
    }
    let base = chdir.clone().unwrap_or_else(|| start.cwd.clone());
    search_path.extend(python_path.iter().map(|p| base.join(p)));
    let application = match application {
        Some(application) => application,
        None => {
            // gunicorn reads ./gunicorn.conf.py when no -c is given.
            let file = base.join(config.as_deref().unwrap_or("gunicorn.conf.py"));
            let text =
                read_config(&file).ok_or(EntrypointError::NoApplication { server: "gunicorn" })?;
            config_wsgi_app(&text)
                .ok_or_else(|| EntrypointError::ConfigWithoutApp(file.display().to_string()))?
        }
    };
    let (module, object) = module_and_object(&application);
    Ok(Entrypoint {
        server: "gunicorn",
        source: AppSource::Module(module),
        object,
        search_path,
        site_packages: Vec::new(),
    })
}

/// `wsgi_app = "module:app"` in a gunicorn config file: a plain string
/// assignment (the file is Python; anything else is not evaluated).
fn config_wsgi_app(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once('=')?;
        if name.trim() != "wsgi_app" {
            return None;
        }
        let value = value.split('#').next()?.trim();
        let quote = value.chars().next().filter(|c| *c == '"' || *c == '\'')?;
        let inner = value.strip_prefix(quote)?.strip_suffix(quote)?;
        Some(inner.to_owned())
    })
}

fn flask_run(
    arguments: &[String],
    start: &ProcessStart,
    mut search_path: Vec<PathBuf>,
) -> Result<Entrypoint, EntrypointError> {
    let mut application = start.env("FLASK_APP").map(str::to_owned);
    for index in 0..arguments.len() {
        if let Some((value, _)) = option_value(arguments, index, &["--app", "-A"]) {
            application = Some(value.to_owned());
        }
    }
    // Flask's own default: wsgi.py, then app.py, in the working directory.
    let application = application.unwrap_or_default();
    if application.is_empty() {
        return Ok(Entrypoint {
            server: "flask run",
            source: AppSource::FirstModule(vec!["wsgi".to_owned(), "app".to_owned()]),
            object: AppObject::Default,
            search_path,
            site_packages: Vec::new(),
        });
    }
    // FLASK_APP may name a file ("src/app.py") or a module ("pkg.app:create_app()").
    let (module, object) = module_and_object(&application);
    let source = if module.ends_with(".py") || module.contains('/') {
        let file = start.cwd.join(&module);
        search_path = with_script_dir(search_path, &file);
        AppSource::File(file)
    } else {
        AppSource::Module(module)
    };
    Ok(Entrypoint {
        server: "flask run",
        source,
        object,
        search_path,
        site_packages: Vec::new(),
    })
}

fn uwsgi(
    arguments: &[String],
    start: &ProcessStart,
    mut search_path: Vec<PathBuf>,
) -> Result<Entrypoint, EntrypointError> {
    let mut source = None;
    let mut object = AppObject::Variable("application".to_owned());
    let mut base = start.cwd.clone();
    for index in 0..arguments.len() {
        if let Some((value, _)) = option_value(arguments, index, &["--chdir"]) {
            base = start.cwd.join(value);
        } else if let Some((value, _)) =
            option_value(arguments, index, &["--module", "-w", "--wsgi"])
        {
            let (module, named) = module_and_object(value);
            source = Some(AppSource::Module(module));
            if named != AppObject::Default {
                object = named;
            }
        } else if let Some((value, _)) = option_value(arguments, index, &["--wsgi-file", "--file"])
        {
            source = Some(AppSource::File(PathBuf::from(value)));
        } else if let Some((value, _)) = option_value(arguments, index, &["--callable"]) {
            object = AppObject::Variable(value.to_owned());
        } else if let Some((value, _)) = option_value(arguments, index, &["--pythonpath", "--pp"]) {
            search_path.push(start.cwd.join(value));
        }
    }
    search_path[0] = base.clone();
    let source = match source.ok_or(EntrypointError::NoApplication { server: "uwsgi" })? {
        AppSource::File(file) => {
            let file = base.join(file);
            search_path = with_script_dir(search_path, &file);
            AppSource::File(file)
        }
        module => module,
    };
    Ok(Entrypoint {
        server: "uwsgi",
        source,
        object,
        search_path,
        site_packages: Vec::new(),
    })
}

fn waitress(
    arguments: &[String],
    search_path: Vec<PathBuf>,
) -> Result<Entrypoint, EntrypointError> {
    let mut factory = false;
    let mut application = None;
    for argument in arguments {
        if argument == "--call" {
            factory = true;
        } else if !argument.starts_with('-') {
            application = Some(argument.clone());
        }
    }
    let application = application.ok_or(EntrypointError::NoApplication {
        server: "waitress-serve",
    })?;
    let (module, object) = module_and_object(&application);
    let object = match object {
        AppObject::Variable(name) if factory => AppObject::Factory(name),
        other => other,
    };
    Ok(Entrypoint {
        server: "waitress-serve",
        source: AppSource::Module(module),
        object,
        search_path,
        site_packages: Vec::new(),
    })
}

/// A script's own directory comes first on its search path, as Python puts
/// it there.
fn with_script_dir(mut search_path: Vec<PathBuf>, script: &Path) -> Vec<PathBuf> {
    if let Some(dir) = script.parent() {
        search_path.insert(0, dir.to_path_buf());
    }
    search_path
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(argv: &str, env: &[(&str, &str)]) -> ProcessStart {
        ProcessStart {
            argv: argv.split_whitespace().map(str::to_owned).collect(),
            environment: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            cwd: PathBuf::from("/srv"),
            executable: Some(PathBuf::from("/usr/local/bin/python3.12")),
        }
    }

    fn no_config(_: &Path) -> Option<String> {
        None
    }

    fn found(argv: &str, env: &[(&str, &str)]) -> Entrypoint {
        find(&start(argv, env), &no_config).expect("an entrypoint")
    }

    #[test]
    fn gunicorn_forms() {
        let plain = found(
            "/venv/bin/python3 /venv/bin/gunicorn -w 2 -b 0.0.0.0:8000 shop.wsgi:app",
            &[],
        );
        assert_eq!(plain.server, "gunicorn");
        assert_eq!(plain.source, AppSource::Module("shop.wsgi".to_owned()));
        assert_eq!(plain.object, AppObject::Variable("app".to_owned()));
        assert_eq!(plain.search_path, vec![PathBuf::from("/srv")]);

        let factory = found("gunicorn --bind=:8000 shop:create_app()", &[]);
        assert_eq!(factory.object, AppObject::Factory("create_app".to_owned()));

        let master = found("gunicorn: master [shop:app]", &[]);
        assert_eq!(master.server, "gunicorn");

        let moved = found(
            "python -m gunicorn --chdir src --pythonpath lib,vendor -k gthread app:app",
            &[("PYTHONPATH", "extra")],
        );
        assert_eq!(moved.source, AppSource::Module("app".to_owned()));
        assert_eq!(
            moved.search_path,
            ["/srv/src", "/srv/extra", "/srv/src/lib", "/srv/src/vendor"]
                .map(PathBuf::from)
                .to_vec()
        );

        let configured = find(&start("gunicorn -c conf/gunicorn.py", &[]), &|path| {
            (path == Path::new("/srv/conf/gunicorn.py")).then(|| {
                "bind = ':8000'\nwsgi_app = \"shop.wsgi:application\"  # here\n".to_owned()
            })
        })
        .expect("from the config file");
        assert_eq!(configured.source, AppSource::Module("shop.wsgi".to_owned()));
        assert_eq!(
            configured.object,
            AppObject::Variable("application".to_owned())
        );

        assert_eq!(
            find(&start("gunicorn -w 2", &[]), &no_config),
            Err(EntrypointError::NoApplication { server: "gunicorn" })
        );
    }

    #[test]
    fn flask_run_forms() {
        let env = found(
            "/venv/bin/flask run --port 5000",
            &[("FLASK_APP", "shop:create_app()")],
        );
        assert_eq!(env.server, "flask run");
        assert_eq!(env.object, AppObject::Factory("create_app".to_owned()));
        let flag = found("python3 -m flask --app src/app.py run", &[]);
        assert_eq!(
            flag.source,
            AppSource::File(PathBuf::from("/srv/src/app.py"))
        );
        assert_eq!(flag.search_path[0], PathBuf::from("/srv/src"));
        let default = found("flask run", &[]);
        assert_eq!(
            default.source,
            AppSource::FirstModule(vec!["wsgi".to_owned(), "app".to_owned()])
        );
    }

    #[test]
    fn scripts_uwsgi_and_waitress() {
        let script = found("python3.12 -u app.py 8080", &[]);
        assert_eq!(script.server, "python");
        assert_eq!(script.source, AppSource::File(PathBuf::from("/srv/app.py")));
        assert_eq!(script.object, AppObject::Default);

        let uwsgi = found(
            "uwsgi --http :8000 --chdir /app --module shop.wsgi:app",
            &[],
        );
        assert_eq!(uwsgi.source, AppSource::Module("shop.wsgi".to_owned()));
        assert_eq!(uwsgi.object, AppObject::Variable("app".to_owned()));
        assert_eq!(uwsgi.search_path[0], PathBuf::from("/app"));
        let wsgi_file = found("uwsgi --wsgi-file run.py --callable application", &[]);
        assert_eq!(
            wsgi_file.source,
            AppSource::File(PathBuf::from("/srv/run.py"))
        );

        let waitress = found("waitress-serve --port=8080 --call shop:create_app", &[]);
        assert_eq!(waitress.object, AppObject::Factory("create_app".to_owned()));

        assert!(matches!(
            find(&start("/usr/bin/node server.js", &[]), &no_config),
            Err(EntrypointError::UnknownServer(_))
        ));
    }

    #[test]
    fn site_packages_of_a_venv_and_of_the_interpreter() {
        let on_path = |path: &Path| path == Path::new("/opt/venv/bin/gunicorn");
        let env = [("PATH", "/opt/venv/bin:/usr/bin"), ("HOME", "/home/app")];
        let by_name = site_packages(&start("gunicorn shop:app", &env), &on_path);
        assert_eq!(
            by_name,
            [
                "/opt/venv/lib/python3.12/site-packages",
                "/opt/venv/local/lib/python3.12/dist-packages",
                "/opt/venv/lib/python3/dist-packages",
                "/usr/local/lib/python3.12/site-packages",
                "/usr/local/local/lib/python3.12/dist-packages",
                "/usr/local/lib/python3/dist-packages",
                "/home/app/.local/lib/python3.12/site-packages",
            ]
            .map(PathBuf::from)
        );
        // A script run by a venv's interpreter; VIRTUAL_ENV first.
        let scripted = site_packages(
            &start(
                "/srv/.venv/bin/python -m gunicorn shop:app",
                &[("VIRTUAL_ENV", "/env")],
            ),
            &|_| false,
        );
        assert_eq!(
            scripted.first(),
            Some(&PathBuf::from("/env/lib/python3.12/site-packages"))
        );
        assert!(scripted.contains(&PathBuf::from("/srv/.venv/lib/python3.12/site-packages")));
        // Nothing on PATH: only the interpreter's prefix.
        let bare = site_packages(&start("gunicorn shop:app", &[]), &|_| false);
        assert_eq!(
            bare[0],
            PathBuf::from("/usr/local/lib/python3.12/site-packages")
        );
    }
}
