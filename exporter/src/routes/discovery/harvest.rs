//! Flask's url rules from an app's source, parsed (ruff's Python parser),
//! never run. The module-level code of the app's modules (and the body of
//! an app factory) is followed statement by statement, with only what
//! rules depend on given a value: string constants (concatenated, or in
//! f-strings of constants), `Flask(...)`, `Blueprint(...)`, Flask-RESTful's
//! `Api(...)`, classes (`MethodView`, `Resource`), functions, and modules
//! of the app's own packages. Rules are collected as Flask builds them:
//! `route`/`get`/`post`/... decorators, `add_url_rule`, `register_blueprint`
//! with prefixes joined as Flask joins them (nested blueprints included),
//! `add_resource`, and the static route. What cannot be followed is said,
//! with where and why.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    path::{Path, PathBuf},
    rc::Rc,
    time::Instant,
};

use ruff_python_ast::{self as ast, Expr, Stmt};
use ruff_text_size::Ranged;

use super::{
    entrypoint::{AppObject, AppSource, Entrypoint},
    tree::{ParseBudget, SourceTree},
};

/// Nested factory calls followed, at most (a factory calling a helper that
/// builds the app).
const MAX_CALL_DEPTH: usize = 8;
/// Nesting followed, at most, of expressions, blocks, imports (`a.b.c`
/// loads `a`, then `a.b`) and registered blueprints together: far past what
/// a person writes, far inside the helper's stack.
pub const MAX_NESTING: usize = 100;
/// Longest string a constant expression may build (`a + a`, f-strings).
pub const MAX_STRING_BYTES: usize = 64 * 1024;
/// Most strings a constant list may hold.
pub const MAX_STRINGS: usize = 4096;
/// Most rules one harvest collects.
pub const MAX_RULES: usize = 10_000;
/// The packages whose constructors and classes the harvester knows
/// (`Flask`, `Blueprint`, `MethodView`; Flask-RESTful's `Api` and
/// `Resource`).
const MODELED_PACKAGES: &[&str] = &["flask", "flask_restful"];

/// Methods a view class may define, as Flask's `MethodView` maps them.
const HTTP_METHODS: [&str; 7] = ["get", "post", "put", "delete", "patch", "head", "options"];

/// One url rule as the harvest found it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HarvestedRule {
    /// The rule text, as Flask's `url_rule` has it.
    pub rule: String,
    /// Methods as given (Flask adds HEAD with GET, and OPTIONS).
    pub methods: BTreeSet<String>,
    pub endpoint: String,
    /// Whether a request without the rule's trailing slash (or with one the
    /// rule lacks) is redirected (Werkzeug's `strict_slashes`), as the
    /// rule's keyword or the app's `url_map.strict_slashes` had it when the
    /// rule entered the map.
    pub strict_slashes: bool,
    /// Where it was registered (inside the process's root), 1-based line.
    pub file: PathBuf,
    pub line: u32,
}

/// What a harvest found: the rules, what it could not follow, and how
/// many files it parsed.
#[derive(Clone, Debug, Default)]
pub struct Harvest {
    pub rules: Vec<HarvestedRule>,
    pub unresolved: Vec<String>,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
    /// The parse budget ran out before everything was read.
    pub budget_spent: bool,
}

/// What a name or expression is, as far as rules care.
#[derive(Clone, Debug)]
enum Value {
    Str(String),
    Bool(bool),
    Strs(Vec<String>),
    /// An application or blueprint (index into the harvest's scaffolds).
    Scaffold(usize),
    /// Flask-RESTful's `Api`, bound to a scaffold, with its prefix.
    Api {
        scaffold: usize,
        prefix: String,
    },
    /// A module of the app's own packages (dotted name).
    Module(String),
    Class(usize),
    /// `SomeView.as_view("name")`.
    View {
        class: usize,
        name: String,
    },
    Function(Rc<Function>),
    None,
    Unknown,
}

#[derive(Debug)]
struct Function {
    def: ast::StmtFunctionDef,
    module: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScaffoldKind {
    App,
    Blueprint,
}

#[derive(Debug)]
struct Scaffold {
    kind: ScaffoldKind,
    name: String,
    url_prefix: Option<String>,
    /// The static route Flask adds (from `static_folder`), if any.
    static_rule: Option<String>,
    /// Rules with their own `strict_slashes`, if given.
    rules: Vec<(HarvestedRule, Option<bool>)>,
    /// Blueprints registered on it, with the `url_prefix` given there and
    /// the app's `url_map.strict_slashes` then (its rules enter the map at
    /// that moment).
    children: Vec<(usize, Option<String>, bool)>,
    /// An app's `url_map.strict_slashes` as the source has set it so far.
    map_strict_slashes: bool,
    file: PathBuf,
    line: u32,
}

#[derive(Debug)]
struct Class {
    name: String,
    /// Handler methods it defines or inherits (upper case).
    handlers: BTreeSet<String>,
    /// A `methods = [...]` class attribute.
    explicit: Option<BTreeSet<String>>,
}

impl Class {
    fn methods(&self) -> BTreeSet<String> {
        self.explicit
            .clone()
            .unwrap_or_else(|| self.handlers.clone())
    }
}

/// A module being read: where its names resolve.
#[derive(Clone, Debug)]
struct Context {
    module: String,
    /// The package relative imports start from.
    package: String,
    file: PathBuf,
    line_starts: Rc<Vec<usize>>,
}

impl Context {
    fn line(&self, offset: usize) -> u32 {
        let index = self.line_starts.partition_point(|&start| start <= offset);
        index as u32
    }
}

type Env = HashMap<String, Value>;

/// A bound the source ran into; what lies past it is not followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Bound {
    Nesting,
    StringBytes,
    Strings,
    Rules,
    Registrations,
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::Nesting => write!(
                f,
                "nested deeper than {MAX_NESTING} (expressions, blocks, imports or blueprints)"
            ),
            Bound::StringBytes => write!(f, "a string over {MAX_STRING_BYTES} bytes"),
            Bound::Strings => write!(f, "a list of more than {MAX_STRINGS} strings"),
            Bound::Rules => write!(f, "more than {MAX_RULES} rules"),
            Bound::Registrations => write!(f, "more than {MAX_RULES} blueprint registrations"),
        }?;
        write!(f, ": not followed past that")
    }
}

/// Where collecting stands: the blueprints registered down to here (a
/// blueprint met again on its own chain is a cycle Flask would refuse),
/// the rules so far, and what could not be followed.
struct Registering<'a> {
    chain: Vec<usize>,
    rules: &'a mut Vec<HarvestedRule>,
    notes: Vec<String>,
    /// Registrations followed: blueprints registering each other twice
    /// over make exponentially many without a rule among them.
    visits: usize,
}

struct Harvester<'a> {
    tree: &'a dyn SourceTree,
    budget: ParseBudget,
    deadline: Instant,
    search_path: Vec<PathBuf>,
    site_packages: Vec<PathBuf>,
    /// The entry module's top-level package: the one name looked up in
    /// site-packages too (an app installed as a package).
    installed_package: Option<String>,
    modules: HashMap<String, Option<Env>>,
    contexts: HashMap<String, Context>,
    loading: HashSet<String>,
    scaffolds: Vec<Scaffold>,
    classes: Vec<Class>,
    unresolved: Vec<String>,
    files: Vec<PathBuf>,
    bytes: usize,
    depth: usize,
    /// How deep the expression, block or import being followed is.
    nesting: usize,
    /// Rules registered on every scaffold together.
    registered: usize,
    /// Bounds hit, each said once.
    bounds_hit: BTreeSet<Bound>,
    /// The budget ran out: nothing more is read.
    exhausted: bool,
}

/// Harvests the rules of the app `entrypoint` names.
pub fn harvest(
    entrypoint: &Entrypoint,
    tree: &dyn SourceTree,
    budget: ParseBudget,
    deadline: Instant,
) -> Harvest {
    let mut harvester = Harvester {
        tree,
        budget,
        deadline,
        search_path: entrypoint.search_path.clone(),
        site_packages: entrypoint.site_packages.clone(),
        installed_package: None,
        modules: HashMap::new(),
        contexts: HashMap::new(),
        loading: HashSet::new(),
        scaffolds: Vec::new(),
        classes: Vec::new(),
        unresolved: Vec::new(),
        files: Vec::new(),
        bytes: 0,
        depth: 0,
        nesting: 0,
        registered: 0,
        bounds_hit: BTreeSet::new(),
        exhausted: false,
    };
    let app = harvester.find_app(entrypoint);
    let mut rules = Vec::new();
    match app {
        Some(app) => {
            let mut registering = Registering {
                chain: Vec::new(),
                rules: &mut rules,
                notes: Vec::new(),
                visits: 0,
            };
            harvester.collect(app, None, None, true, &mut registering);
            let mut notes = registering.notes;
            notes.sort();
            notes.dedup();
            harvester.unresolved.extend(notes);
        }
        None if harvester.unresolved.is_empty() => harvester
            .unresolved
            .push("no Flask application found where the entrypoint points".to_owned()),
        None => {}
    }
    Harvest {
        rules,
        unresolved: harvester.unresolved,
        files: harvester.files,
        budget_spent: harvester.exhausted,
    }
}

impl Harvester<'_> {
    fn find_app(&mut self, entrypoint: &Entrypoint) -> Option<usize> {
        let top_level = |module: &str| module.split('.').next().unwrap_or(module).to_owned();
        let module = match &entrypoint.source {
            AppSource::Module(module) => {
                self.installed_package = Some(top_level(module));
                self.load(module).map(|_| module.clone())
            }
            AppSource::FirstModule(modules) => modules
                .iter()
                .find(|module| {
                    self.installed_package = Some(top_level(module));
                    self.load(module).is_some()
                })
                .cloned(),
            AppSource::File(file) => self
                .load_file("__main__", "", file)
                .then(|| "__main__".to_owned()),
        };
        let Some(module) = module else {
            self.unresolved.push(format!(
                "the application's module was not found on {:?}",
                self.search_path
            ));
            return None;
        };
        let env = self
            .modules
            .get(&module)
            .cloned()
            .flatten()
            .unwrap_or_default();
        let value = match &entrypoint.object {
            // `flask run` calls a function it is pointed at (Flask's
            // find_app_by_string); gunicorn would serve it as the WSGI app.
            AppObject::Variable(name) => match env.get(name) {
                Some(Value::Function(function)) if entrypoint.server.starts_with("flask") => {
                    Some(self.call_function(&function.clone()))
                }
                other => other.cloned(),
            },
            AppObject::Factory(name) => match env.get(name) {
                Some(Value::Function(function)) => Some(self.call_function(&function.clone())),
                _ => None,
            },
            AppObject::Default => {
                // Flask's own lookup: `app`, `application`, a factory, then
                // the one Flask instance of the module.
                let named = ["app", "application"]
                    .iter()
                    .find_map(|name| match env.get(*name) {
                        Some(value @ Value::Scaffold(_)) => Some(value.clone()),
                        _ => None,
                    });
                let from_factory = || {
                    ["create_app", "make_app"]
                        .iter()
                        .find_map(|name| match env.get(*name) {
                            Some(Value::Function(function)) => Some(function.clone()),
                            _ => None,
                        })
                };
                match named {
                    Some(value) => Some(value),
                    None => match from_factory() {
                        Some(function) => Some(self.call_function(&function)),
                        None => env.values().find(|value| self.is_app(value)).cloned(),
                    },
                }
            }
        };
        match value {
            Some(Value::Scaffold(index)) if self.scaffolds[index].kind == ScaffoldKind::App => {
                Some(index)
            }
            _ => {
                self.unresolved.push(format!(
                    "{module} has no Flask application as {:?}",
                    entrypoint.object
                ));
                None
            }
        }
    }

    fn is_app(&self, value: &Value) -> bool {
        matches!(value, Value::Scaffold(index) if self.scaffolds[*index].kind == ScaffoldKind::App)
    }

    // ------------------------------------------------------------ modules

    fn over_budget(&mut self) -> bool {
        if !self.exhausted
            && (self.files.len() >= self.budget.files
                || self.bytes >= self.budget.bytes
                || Instant::now() >= self.deadline)
        {
            self.exhausted = true;
            self.unresolved.push(format!(
                "parse budget spent ({} files, {} bytes, or the time): the rest was not read",
                self.files.len(),
                self.bytes
            ));
        }
        self.exhausted
    }

    /// Goes one level deeper, unless that is past [`MAX_NESTING`].
    fn enter(&mut self) -> bool {
        if self.nesting >= MAX_NESTING {
            self.bound_hit(Bound::Nesting);
            return false;
        }
        self.nesting += 1;
        true
    }

    fn leave(&mut self) {
        self.nesting -= 1;
    }

    /// Says, once, that a bound cut what was followed.
    fn bound_hit(&mut self, bound: Bound) {
        if self.bounds_hit.insert(bound) {
            self.unresolved.push(bound.to_string());
        }
    }

    /// The file of a dotted module on the search path (site-packages too
    /// for the installed app's own package).
    fn module_file(&self, module: &str) -> Option<(PathBuf, bool)> {
        let relative: PathBuf = module.split('.').collect();
        let installed = self
            .installed_package
            .as_deref()
            .is_some_and(|package| module.split('.').next() == Some(package));
        let site_packages = self.site_packages.iter().filter(|_| installed);
        self.search_path
            .iter()
            .chain(site_packages)
            .find_map(|dir| {
                let package = dir.join(&relative);
                let init = package.join("__init__.py");
                if self.tree.is_dir(&package) && self.tree.is_file(&init) {
                    return Some((init, true));
                }
                let mut file = package.clone();
                file.set_extension("py");
                self.tree.is_file(&file).then_some((file, false))
            })
    }

    /// Loads a module of the app's own packages; `None` when it is not one
    /// (the standard library, Flask itself) or could not be read. The
    /// libraries this harvester models are never read, even where the
    /// search path has them (`PYTHONPATH` naming a site-packages): read,
    /// `Flask` would be a class like any other.
    fn load(&mut self, module: &str) -> Option<&Env> {
        let top = module.split('.').next().unwrap_or(module);
        if MODELED_PACKAGES.contains(&top) {
            self.modules.entry(module.to_owned()).or_insert(None);
        }
        if !self.modules.contains_key(module)
            && !self.loading.contains(module)
            && !self.over_budget()
        {
            if !self.enter() {
                return None;
            }
            // A parent package runs first, as Python imports it.
            if let Some((parent, _)) = module.rsplit_once('.') {
                self.load(parent);
            }
            match self.module_file(module) {
                Some((file, is_package)) => {
                    let package = if is_package {
                        module.to_owned()
                    } else {
                        module.rsplit_once('.').map_or("", |(p, _)| p).to_owned()
                    };
                    self.load_file(module, &package, &file);
                }
                None => {
                    self.modules.insert(module.to_owned(), None);
                }
            }
            self.leave();
        }
        self.modules.get(module).and_then(Option::as_ref)
    }

    /// Parses and runs (in this module's sense) one file as `module`.
    fn load_file(&mut self, module: &str, package: &str, file: &Path) -> bool {
        if self.over_budget() {
            return false;
        }
        let Some(source) = self.tree.read(file, self.budget.file_bytes) else {
            self.unresolved.push(format!(
                "{}: not readable, or over {} bytes",
                file.display(),
                self.budget.file_bytes
            ));
            self.modules.insert(module.to_owned(), None);
            return false;
        };
        self.files.push(file.to_path_buf());
        self.bytes += source.len();
        let parsed = match ruff_python_parser::parse_module(&source) {
            Ok(parsed) => parsed,
            Err(error) => {
                self.unresolved
                    .push(format!("{}: does not parse: {error}", file.display()));
                self.modules.insert(module.to_owned(), None);
                return false;
            }
        };
        let context = Context {
            module: module.to_owned(),
            package: package.to_owned(),
            file: file.to_path_buf(),
            line_starts: Rc::new(
                std::iter::once(0)
                    .chain(source.match_indices('\n').map(|(at, _)| at + 1))
                    .collect(),
            ),
        };
        self.loading.insert(module.to_owned());
        self.contexts.insert(module.to_owned(), context.clone());
        let mut env = Env::new();
        self.exec_block(&parsed.syntax().body, &mut env, &context);
        self.loading.remove(module);
        self.modules.insert(module.to_owned(), Some(env));
        true
    }

    /// The absolute module an import names (`level` dots before it).
    fn absolute(&self, context: &Context, level: u32, module: Option<&str>) -> Option<String> {
        let mut base: Vec<&str> = if level == 0 {
            Vec::new()
        } else {
            context
                .package
                .split('.')
                .filter(|p| !p.is_empty())
                .collect()
        };
        for _ in 1..level {
            base.pop()?;
        }
        base.extend(module.into_iter().flat_map(|m| m.split('.')));
        (!base.is_empty()).then(|| base.join("."))
    }

    // ------------------------------------------------------------ statements

    /// Runs statements; returns what a `return` gave (in a function body).
    fn exec_block(&mut self, body: &[Stmt], env: &mut Env, context: &Context) -> Option<Value> {
        let mut returned = None;
        for statement in body {
            // The deadline too: a body may call functions many times over.
            if self.over_budget() {
                break;
            }
            if let Some(value) = self.exec(statement, env, context) {
                returned.get_or_insert(value);
            }
        }
        returned
    }

    fn exec(&mut self, statement: &Stmt, env: &mut Env, context: &Context) -> Option<Value> {
        if !self.enter() {
            return None;
        }
        let returned = self.exec_statement(statement, env, context);
        self.leave();
        returned
    }

    fn exec_statement(
        &mut self,
        statement: &Stmt,
        env: &mut Env,
        context: &Context,
    ) -> Option<Value> {
        match statement {
            Stmt::Import(import) => {
                for alias in &import.names {
                    let name = alias.name.as_str();
                    let loaded = self.load(name).is_some();
                    let value = |module: &str| {
                        if loaded {
                            Value::Module(module.to_owned())
                        } else {
                            Value::Unknown
                        }
                    };
                    match &alias.asname {
                        Some(asname) => {
                            env.insert(asname.as_str().to_owned(), value(name));
                        }
                        None => {
                            let top = name.split('.').next().unwrap_or(name);
                            let top_loaded = self.modules.get(top).is_some_and(Option::is_some);
                            env.insert(
                                top.to_owned(),
                                if top_loaded {
                                    Value::Module(top.to_owned())
                                } else {
                                    Value::Unknown
                                },
                            );
                        }
                    }
                }
            }
            Stmt::ImportFrom(import) => {
                let module = import.module.as_ref().map(|m| m.as_str());
                let base = self.absolute(context, import.level, module)?;
                self.load(&base);
                for alias in &import.names {
                    let name = alias.name.as_str();
                    let bound = alias
                        .asname
                        .as_ref()
                        .map_or(name, |a| a.as_str())
                        .to_owned();
                    if name == "*" {
                        if let Some(Some(names)) = self.modules.get(&base).cloned() {
                            env.extend(names.into_iter().filter(|(n, _)| !n.starts_with('_')));
                        }
                        continue;
                    }
                    let submodule = format!("{base}.{name}");
                    let known = self
                        .modules
                        .get(&base)
                        .and_then(Option::as_ref)
                        .and_then(|names| names.get(name))
                        .cloned();
                    let value = match known {
                        Some(value) => value,
                        None if self.load(&submodule).is_some() => Value::Module(submodule),
                        None => Value::Unknown,
                    };
                    env.insert(bound, value);
                }
            }
            Stmt::Assign(assign) => {
                let value = self.eval(&assign.value, env, context);
                for target in &assign.targets {
                    self.set_map_strict_slashes(target, &value, env, context);
                    self.bind(target, value.clone(), env);
                }
            }
            Stmt::AnnAssign(assign) => {
                if let Some(value) = &assign.value {
                    let value = self.eval(value, env, context);
                    self.bind(&assign.target, value, env);
                }
            }
            Stmt::FunctionDef(def) => {
                let function = Rc::new(Function {
                    def: def.clone(),
                    module: context.module.clone(),
                });
                for decorator in &def.decorator_list {
                    self.decorate(&decorator.expression, def.name.as_str(), None, env, context);
                }
                env.insert(def.name.as_str().to_owned(), Value::Function(function));
            }
            Stmt::ClassDef(class) => {
                let index = self.class(class, env, context);
                for decorator in &class.decorator_list {
                    let view = Value::View {
                        class: index,
                        name: class.name.as_str().to_owned(),
                    };
                    self.decorate(
                        &decorator.expression,
                        class.name.as_str(),
                        Some(view),
                        env,
                        context,
                    );
                }
                env.insert(class.name.as_str().to_owned(), Value::Class(index));
            }
            Stmt::Expr(expression) => {
                self.eval(&expression.value, env, context);
            }
            Stmt::Return(returned) => {
                return Some(match &returned.value {
                    Some(value) => self.eval(value, env, context),
                    None => Value::None,
                });
            }
            // Both ways of a branch: whichever runs, its rules are the app's.
            Stmt::If(branch) => {
                let mut returned = self.exec_block(&branch.body, env, context);
                for clause in &branch.elif_else_clauses {
                    let value = self.exec_block(&clause.body, env, context);
                    returned = returned.or(value);
                }
                return returned;
            }
            Stmt::Try(attempt) => {
                let mut returned = self.exec_block(&attempt.body, env, context);
                for handler in &attempt.handlers {
                    let ast::ExceptHandler::ExceptHandler(handler) = handler;
                    returned = returned.or(self.exec_block(&handler.body, env, context));
                }
                returned = returned.or(self.exec_block(&attempt.orelse, env, context));
                return returned.or(self.exec_block(&attempt.finalbody, env, context));
            }
            Stmt::With(with) => return self.exec_block(&with.body, env, context),
            Stmt::For(each) => return self.exec_block(&each.body, env, context),
            Stmt::While(each) => return self.exec_block(&each.body, env, context),
            _ => {}
        }
        None
    }

    /// `app.url_map.strict_slashes = False`: rules that enter the map from
    /// then on take it as their default.
    fn set_map_strict_slashes(
        &mut self,
        target: &Expr,
        value: &Value,
        env: &Env,
        context: &Context,
    ) {
        let Expr::Attribute(setting) = target else {
            return;
        };
        let Expr::Attribute(map) = setting.value.as_ref() else {
            return;
        };
        if setting.attr.as_str() != "strict_slashes" || map.attr.as_str() != "url_map" {
            return;
        }
        if let (Value::Scaffold(app), Value::Bool(strict)) =
            (self.eval(&map.value, env, context), value)
            && self.scaffolds[app].kind == ScaffoldKind::App
        {
            self.scaffolds[app].map_strict_slashes = *strict;
        }
    }

    fn bind(&mut self, target: &Expr, value: Value, env: &mut Env) {
        if let Expr::Name(name) = target {
            env.insert(name.id.as_str().to_owned(), value);
        }
    }

    fn class(&mut self, class: &ast::StmtClassDef, env: &Env, context: &Context) -> usize {
        let mut handlers = BTreeSet::new();
        let mut explicit = None;
        if let Some(arguments) = &class.arguments {
            for base in &arguments.args {
                if let Value::Class(base) = self.eval(base, env, context) {
                    handlers.extend(self.classes[base].handlers.iter().cloned());
                    explicit = explicit.or_else(|| self.classes[base].explicit.clone());
                }
            }
        }
        for statement in &class.body {
            match statement {
                Stmt::FunctionDef(def) if HTTP_METHODS.contains(&def.name.as_str()) => {
                    handlers.insert(def.name.as_str().to_ascii_uppercase());
                }
                Stmt::Assign(assign)
                    if assign
                        .targets
                        .iter()
                        .any(|t| matches!(t, Expr::Name(n) if n.id.as_str() == "methods")) =>
                {
                    if let Value::Strs(methods) = self.eval(&assign.value, env, context) {
                        explicit = Some(methods.iter().map(|m| m.to_ascii_uppercase()).collect());
                    }
                }
                _ => {}
            }
        }
        self.classes.push(Class {
            name: class.name.as_str().to_owned(),
            handlers,
            explicit,
        });
        self.classes.len() - 1
    }

    /// A decorator on a view function or class named `name`.
    fn decorate(
        &mut self,
        decorator: &Expr,
        name: &str,
        view: Option<Value>,
        env: &Env,
        context: &Context,
    ) {
        let Expr::Call(call) = decorator else {
            return;
        };
        let Expr::Attribute(attribute) = call.func.as_ref() else {
            return;
        };
        let method = attribute.attr.as_str();
        let shortcut = match method {
            "route" => None,
            "get" | "post" | "put" | "delete" | "patch" => Some(method.to_ascii_uppercase()),
            _ => return,
        };
        let Value::Scaffold(scaffold) = self.eval(&attribute.value, env, context) else {
            return;
        };
        let line = context.line(decorator.start().to_usize());
        let Some(rule) = self.rule_argument(
            call.arguments.args.first(),
            &call.arguments,
            "rule",
            env,
            context,
            line,
        ) else {
            return;
        };
        let methods = match shortcut {
            Some(method) => BTreeSet::from([method]),
            None => self.methods(&call.arguments, view.as_ref(), env, context),
        };
        let endpoint = self
            .keyword_str(&call.arguments, "endpoint", env, context)
            .unwrap_or_else(|| name.to_owned());
        let strict_slashes = self.strict_slashes(&call.arguments, env, context, line);
        self.register(
            scaffold,
            rule,
            methods,
            endpoint,
            strict_slashes,
            context,
            line,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        scaffold: usize,
        rule: String,
        methods: BTreeSet<String>,
        endpoint: String,
        strict_slashes: Option<bool>,
        context: &Context,
        line: u32,
    ) {
        if self.registered >= MAX_RULES {
            self.bound_hit(Bound::Rules);
            return;
        }
        self.registered += 1;
        let scaffold = &mut self.scaffolds[scaffold];
        // An app's rule enters its map now; a blueprint's when registered.
        let strict_slashes = match scaffold.kind {
            ScaffoldKind::App => Some(strict_slashes.unwrap_or(scaffold.map_strict_slashes)),
            ScaffoldKind::Blueprint => strict_slashes,
        };
        scaffold.rules.push((
            HarvestedRule {
                rule,
                methods,
                endpoint,
                strict_slashes: true,
                file: context.file.clone(),
                line,
            },
            strict_slashes,
        ));
    }

    /// A rule's `strict_slashes=` keyword, when it is a constant.
    fn strict_slashes(
        &mut self,
        arguments: &ast::Arguments,
        env: &Env,
        context: &Context,
        line: u32,
    ) -> Option<bool> {
        match self.eval(Self::keyword(arguments, "strict_slashes")?, env, context) {
            Value::Bool(strict) => Some(strict),
            Value::None => None,
            _ => {
                self.unresolved.push(format!(
                    "{}:{line}: a strict_slashes that is not a constant: taken as the map's",
                    context.file.display()
                ));
                None
            }
        }
    }

    /// A rule argument that must be a constant string; says why not.
    fn rule_argument(
        &mut self,
        positional: Option<&Expr>,
        arguments: &ast::Arguments,
        keyword: &str,
        env: &Env,
        context: &Context,
        line: u32,
    ) -> Option<String> {
        let expression = positional.or_else(|| {
            arguments
                .keywords
                .iter()
                .find(|k| k.arg.as_ref().is_some_and(|a| a.as_str() == keyword))
                .map(|k| &k.value)
        })?;
        match self.eval(expression, env, context) {
            Value::Str(rule) => Some(rule),
            _ => {
                self.unresolved.push(format!(
                    "{}:{line}: a rule that is not a constant string",
                    context.file.display()
                ));
                None
            }
        }
    }

    /// `methods=[...]`, else the view class's, else GET.
    fn methods(
        &mut self,
        arguments: &ast::Arguments,
        view: Option<&Value>,
        env: &Env,
        context: &Context,
    ) -> BTreeSet<String> {
        let given = arguments
            .keywords
            .iter()
            .find(|k| k.arg.as_ref().is_some_and(|a| a.as_str() == "methods"))
            .map(|k| self.eval(&k.value, env, context));
        match (given, view) {
            (Some(Value::Strs(methods)), _) => {
                methods.iter().map(|m| m.to_ascii_uppercase()).collect()
            }
            (Some(Value::Str(method)), _) => BTreeSet::from([method.to_ascii_uppercase()]),
            (_, Some(Value::View { class, .. })) if !self.classes[*class].methods().is_empty() => {
                self.classes[*class].methods()
            }
            _ => BTreeSet::from(["GET".to_owned()]),
        }
    }

    fn keyword<'e>(arguments: &'e ast::Arguments, name: &str) -> Option<&'e Expr> {
        arguments
            .keywords
            .iter()
            .find(|k| k.arg.as_ref().is_some_and(|a| a.as_str() == name))
            .map(|k| &k.value)
    }

    fn keyword_str(
        &mut self,
        arguments: &ast::Arguments,
        name: &str,
        env: &Env,
        context: &Context,
    ) -> Option<String> {
        match self.eval(Self::keyword(arguments, name)?, env, context) {
            Value::Str(text) => Some(text),
            _ => None,
        }
    }

    // ------------------------------------------------------------ expressions

    fn eval(&mut self, expression: &Expr, env: &Env, context: &Context) -> Value {
        if !self.enter() {
            return Value::Unknown;
        }
        let value = self.eval_expression(expression, env, context);
        self.leave();
        value
    }

    fn eval_expression(&mut self, expression: &Expr, env: &Env, context: &Context) -> Value {
        match expression {
            Expr::StringLiteral(literal) => Value::Str(literal.value.to_str().to_owned()),
            Expr::FString(fstring) => self.fstring(fstring, env, context),
            Expr::NoneLiteral(_) => Value::None,
            Expr::BooleanLiteral(literal) => Value::Bool(literal.value),
            Expr::Name(name) => env.get(name.id.as_str()).cloned().unwrap_or(Value::Unknown),
            Expr::BinOp(operation) if operation.op == ast::Operator::Add => {
                match (
                    self.eval(&operation.left, env, context),
                    self.eval(&operation.right, env, context),
                ) {
                    (Value::Str(left), Value::Str(right))
                        if left.len() + right.len() <= MAX_STRING_BYTES =>
                    {
                        Value::Str(left + &right)
                    }
                    (Value::Str(_), Value::Str(_)) => {
                        self.bound_hit(Bound::StringBytes);
                        Value::Unknown
                    }
                    _ => Value::Unknown,
                }
            }
            Expr::List(ast::ExprList { elts, .. })
            | Expr::Tuple(ast::ExprTuple { elts, .. })
            | Expr::Set(ast::ExprSet { elts, .. }) => {
                if elts.len() > MAX_STRINGS {
                    self.bound_hit(Bound::Strings);
                    return Value::Unknown;
                }
                let mut strings = Vec::new();
                for element in elts {
                    match self.eval(element, env, context) {
                        Value::Str(text) => strings.push(text),
                        _ => return Value::Unknown,
                    }
                }
                Value::Strs(strings)
            }
            Expr::Attribute(attribute) => match self.eval(&attribute.value, env, context) {
                Value::Module(module) => self
                    .load(&module)
                    .and_then(|env| env.get(attribute.attr.as_str()).cloned())
                    .or_else(|| {
                        let submodule = format!("{module}.{}", attribute.attr.as_str());
                        self.load(&submodule).map(|_| Value::Module(submodule))
                    })
                    .unwrap_or(Value::Unknown),
                _ => Value::Unknown,
            },
            Expr::Call(call) => self.call(call, env, context),
            _ => Value::Unknown,
        }
    }

    fn fstring(&mut self, fstring: &ast::ExprFString, env: &Env, context: &Context) -> Value {
        let mut text = String::new();
        for part in fstring.value.iter() {
            match part {
                ast::FStringPart::Literal(literal) => text.push_str(&literal.value),
                ast::FStringPart::FString(inner) => {
                    for element in inner.elements.iter() {
                        match element {
                            ast::InterpolatedStringElement::Literal(literal) => {
                                text.push_str(&literal.value)
                            }
                            ast::InterpolatedStringElement::Interpolation(interpolation) => {
                                if interpolation.format_spec.is_some() {
                                    return Value::Unknown;
                                }
                                match self.eval(&interpolation.expression, env, context) {
                                    Value::Str(value) => text.push_str(&value),
                                    _ => return Value::Unknown,
                                }
                                if text.len() > MAX_STRING_BYTES {
                                    self.bound_hit(Bound::StringBytes);
                                    return Value::Unknown;
                                }
                            }
                        }
                    }
                }
            }
        }
        Value::Str(text)
    }

    fn call(&mut self, call: &ast::ExprCall, env: &Env, context: &Context) -> Value {
        let arguments = &call.arguments;
        let line = context.line(call.start().to_usize());
        match call.func.as_ref() {
            Expr::Attribute(attribute) => {
                let method = attribute.attr.as_str();
                let target = self.eval(&attribute.value, env, context);
                match (&target, method) {
                    (Value::Scaffold(scaffold), "register_blueprint") => {
                        let child = arguments.args.first().map(|a| self.eval(a, env, context));
                        let prefix = match Self::keyword(arguments, "url_prefix")
                            .map(|e| self.eval(e, env, context))
                        {
                            Some(Value::Str(prefix)) => Some(prefix),
                            Some(Value::None) | None => None,
                            Some(_) => {
                                self.unresolved.push(format!(
                                    "{}:{line}: a url_prefix that is not a constant string",
                                    context.file.display()
                                ));
                                None
                            }
                        };
                        match child {
                            Some(Value::Scaffold(child)) => {
                                let parent = &mut self.scaffolds[*scaffold];
                                let strict = parent.map_strict_slashes;
                                parent.children.push((child, prefix, strict));
                            }
                            _ => self.unresolved.push(format!(
                                "{}:{line}: a blueprint this harvest cannot follow",
                                context.file.display()
                            )),
                        }
                        Value::None
                    }
                    (Value::Scaffold(scaffold), "add_url_rule") => {
                        let scaffold = *scaffold;
                        let Some(rule) = self.rule_argument(
                            arguments.args.first(),
                            arguments,
                            "rule",
                            env,
                            context,
                            line,
                        ) else {
                            return Value::None;
                        };
                        let view = arguments
                            .args
                            .get(2)
                            .or_else(|| Self::keyword(arguments, "view_func"))
                            .map(|e| self.eval(e, env, context));
                        let endpoint = match arguments
                            .args
                            .get(1)
                            .or_else(|| Self::keyword(arguments, "endpoint"))
                        {
                            Some(e) => match self.eval(e, env, context) {
                                Value::Str(endpoint) => Some(endpoint),
                                _ => None,
                            },
                            None => None,
                        };
                        let endpoint = endpoint.unwrap_or_else(|| match &view {
                            Some(Value::View { name, .. }) => name.clone(),
                            Some(Value::Function(function)) => {
                                function.def.name.as_str().to_owned()
                            }
                            _ => String::new(),
                        });
                        let methods = self.methods(arguments, view.as_ref(), env, context);
                        let strict_slashes = self.strict_slashes(arguments, env, context, line);
                        self.register(
                            scaffold,
                            rule,
                            methods,
                            endpoint,
                            strict_slashes,
                            context,
                            line,
                        );
                        Value::None
                    }
                    (Value::Api { scaffold, prefix }, "add_resource") => {
                        let (scaffold, prefix) = (*scaffold, prefix.clone());
                        let Some(Value::Class(class)) =
                            arguments.args.first().map(|a| self.eval(a, env, context))
                        else {
                            return Value::None;
                        };
                        let methods = self.classes[class].methods();
                        let endpoint = self
                            .keyword_str(arguments, "endpoint", env, context)
                            .unwrap_or_else(|| self.classes[class].name.to_ascii_lowercase());
                        // Flask-RESTful hands other keywords to add_url_rule.
                        let strict_slashes = self.strict_slashes(arguments, env, context, line);
                        for url in arguments.args.iter().skip(1) {
                            match self.eval(url, env, context) {
                                Value::Str(url) => self.register(
                                    scaffold,
                                    format!("{prefix}{url}"),
                                    methods.clone(),
                                    endpoint.clone(),
                                    strict_slashes,
                                    context,
                                    line,
                                ),
                                _ => self.unresolved.push(format!(
                                    "{}:{line}: a resource URL that is not a constant string",
                                    context.file.display()
                                )),
                            }
                        }
                        Value::None
                    }
                    (Value::Class(class), "as_view") => Value::View {
                        class: *class,
                        name: match arguments.args.first().map(|a| self.eval(a, env, context)) {
                            Some(Value::Str(name)) => name,
                            _ => self.classes[*class].name.clone(),
                        },
                    },
                    (Value::Module(_), constructor) => {
                        // `flask.Flask(...)`, or a factory in another module.
                        match self.eval(&call.func, env, context) {
                            Value::Function(function) => self.call_function(&function),
                            Value::Unknown => {
                                self.construct(constructor, arguments, env, context, line)
                            }
                            _ => Value::Unknown,
                        }
                    }
                    (Value::Unknown, constructor) => {
                        self.construct(constructor, arguments, env, context, line)
                    }
                    _ => Value::Unknown,
                }
            }
            Expr::Name(name) => match env.get(name.id.as_str()) {
                Some(Value::Function(function)) => {
                    let function = function.clone();
                    self.call_function(&function)
                }
                Some(Value::Class(_)) => Value::Unknown,
                _ => self.construct(name.id.as_str(), arguments, env, context, line),
            },
            _ => Value::Unknown,
        }
    }

    /// `Flask(...)`, `Blueprint(...)`, Flask-RESTful's `Api(...)`, by the
    /// name they are called by (imported from outside the app).
    fn construct(
        &mut self,
        name: &str,
        arguments: &ast::Arguments,
        env: &Env,
        context: &Context,
        line: u32,
    ) -> Value {
        match name {
            "Flask" | "Blueprint" => {
                let kind = if name == "Flask" {
                    ScaffoldKind::App
                } else {
                    ScaffoldKind::Blueprint
                };
                let label = match arguments.args.first().map(|a| self.eval(a, env, context)) {
                    Some(Value::Str(label)) => label,
                    _ => name.to_owned(),
                };
                let url_prefix = match Self::keyword(arguments, "url_prefix")
                    .map(|e| self.eval(e, env, context))
                {
                    Some(Value::Str(prefix)) => Some(prefix),
                    _ => None,
                };
                // Flask serves `static_folder` ("static" for an app, none
                // for a blueprint unless given) at `static_url_path`.
                let folder = match Self::keyword(arguments, "static_folder")
                    .map(|e| self.eval(e, env, context))
                {
                    Some(Value::Str(folder)) => Some(folder),
                    Some(Value::None) => None,
                    Some(_) => Some(String::new()).filter(|_| kind == ScaffoldKind::App),
                    None => (kind == ScaffoldKind::App).then(|| "static".to_owned()),
                };
                let url_path = match Self::keyword(arguments, "static_url_path")
                    .map(|e| self.eval(e, env, context))
                {
                    Some(Value::Str(path)) => Some(path),
                    _ => None,
                };
                let static_rule = folder.map(|folder| {
                    let path = url_path.unwrap_or_else(|| {
                        let base = folder
                            .trim_end_matches('/')
                            .rsplit('/')
                            .next()
                            .unwrap_or("");
                        format!("/{base}").trim_end_matches('/').to_owned()
                    });
                    format!("{path}/<path:filename>")
                });
                self.scaffolds.push(Scaffold {
                    kind,
                    name: label,
                    url_prefix,
                    static_rule,
                    rules: Vec::new(),
                    children: Vec::new(),
                    map_strict_slashes: true,
                    file: context.file.clone(),
                    line,
                });
                Value::Scaffold(self.scaffolds.len() - 1)
            }
            "Api" => {
                let bound = arguments
                    .args
                    .first()
                    .or_else(|| Self::keyword(arguments, "app"))
                    .map(|a| self.eval(a, env, context));
                let prefix = self
                    .keyword_str(arguments, "prefix", env, context)
                    .unwrap_or_default();
                match bound {
                    Some(Value::Scaffold(scaffold)) => Value::Api { scaffold, prefix },
                    _ => {
                        self.unresolved.push(format!(
                            "{}:{line}: an Api not bound to an app or blueprint at creation (init_app is not followed)",
                            context.file.display()
                        ));
                        Value::Unknown
                    }
                }
            }
            _ => Value::Unknown,
        }
    }

    /// Runs a function's body (an app factory) and returns what it returns.
    fn call_function(&mut self, function: &Rc<Function>) -> Value {
        if self.depth >= MAX_CALL_DEPTH || self.exhausted {
            return Value::Unknown;
        }
        let Some(Some(mut env)) = self.modules.get(&function.module).cloned() else {
            return Value::Unknown;
        };
        let Some(context) = self.context_of(&function.module) else {
            return Value::Unknown;
        };
        self.depth += 1;
        let returned = self.exec_block(&function.def.body, &mut env, &context);
        self.depth -= 1;
        returned.unwrap_or(Value::None)
    }

    /// The context a module's functions run in.
    fn context_of(&self, module: &str) -> Option<Context> {
        self.contexts.get(module).cloned()
    }

    // ------------------------------------------------------------ rules

    /// The rules of scaffold `index` as registered on the app, under the
    /// prefix its registration gave it (Flask's joining), and the app map's
    /// `strict_slashes` when it was registered. A nested blueprint's name
    /// is its parent's, a dot and its own (`parent_name`), as its
    /// endpoints are.
    fn collect(
        &self,
        index: usize,
        prefix: Option<String>,
        parent_name: Option<&str>,
        map_strict_slashes: bool,
        registering: &mut Registering<'_>,
    ) {
        let scaffold = &self.scaffolds[index];
        if registering.chain.contains(&index) {
            registering.notes.push(format!(
                "{}:{}: blueprint {:?} is registered into itself: not followed",
                scaffold.file.display(),
                scaffold.line,
                scaffold.name
            ));
            return;
        }
        if registering.chain.len() >= MAX_NESTING {
            registering.notes.push(Bound::Nesting.to_string());
            return;
        }
        registering.visits += 1;
        if registering.visits > MAX_RULES {
            registering.notes.push(Bound::Registrations.to_string());
            return;
        }
        let name = match (scaffold.kind, parent_name) {
            (ScaffoldKind::App, _) => None,
            (ScaffoldKind::Blueprint, None) => Some(scaffold.name.clone()),
            (ScaffoldKind::Blueprint, Some(parent)) => Some(format!("{parent}.{}", scaffold.name)),
        };
        let endpoint_of = |endpoint: &str| match &name {
            Some(name) => format!("{name}.{endpoint}"),
            None => endpoint.to_owned(),
        };
        let join = |rule: &str| match &prefix {
            Some(prefix) if rule.is_empty() => prefix.clone(),
            Some(prefix) => format!(
                "{}/{}",
                prefix.trim_end_matches('/'),
                rule.trim_start_matches('/')
            ),
            None => rule.to_owned(),
        };
        let static_rule = scaffold.static_rule.as_ref().map(|rule| HarvestedRule {
            rule: join(rule),
            methods: BTreeSet::from(["GET".to_owned()]),
            endpoint: endpoint_of("static"),
            // An app's static rule enters the map before any setting.
            strict_slashes: scaffold.kind == ScaffoldKind::App || map_strict_slashes,
            file: scaffold.file.clone(),
            line: scaffold.line,
        });
        let own = scaffold
            .rules
            .iter()
            .map(|(rule, strict_slashes)| HarvestedRule {
                rule: join(&rule.rule),
                endpoint: endpoint_of(&rule.endpoint),
                strict_slashes: strict_slashes.unwrap_or(map_strict_slashes),
                ..rule.clone()
            });
        for rule in static_rule.into_iter().chain(own) {
            // A blueprint registered many times over multiplies its rules.
            if registering.rules.len() >= MAX_RULES {
                registering.notes.push(Bound::Rules.to_string());
                return;
            }
            registering.rules.push(rule);
        }
        registering.chain.push(index);
        for (child, given, strict_then) in &scaffold.children {
            let child_prefix = given
                .clone()
                .or_else(|| self.scaffolds[*child].url_prefix.clone());
            let joined = match (&prefix, child_prefix) {
                (Some(outer), Some(inner)) => Some(format!(
                    "{}/{}",
                    outer.trim_end_matches('/'),
                    inner.trim_start_matches('/')
                )),
                (None, inner) => inner,
                (outer, None) => outer.clone(),
            };
            // Nested blueprints enter the map with the outermost one.
            let strict = match scaffold.kind {
                ScaffoldKind::App => *strict_then,
                ScaffoldKind::Blueprint => map_strict_slashes,
            };
            self.collect(*child, joined, name.as_deref(), strict, registering);
            if registering.rules.len() >= MAX_RULES {
                break;
            }
        }
        registering.chain.pop();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    use crate::routes::discovery::tree::FilesInMemory as Files;

    fn entry(module: &str, object: AppObject) -> Entrypoint {
        Entrypoint {
            server: "gunicorn",
            source: AppSource::Module(module.to_owned()),
            object,
            search_path: vec![PathBuf::from("/srv")],
            site_packages: vec![PathBuf::from("/venv/lib/python3.12/site-packages")],
        }
    }

    fn run(files: &Files, entrypoint: &Entrypoint, budget: ParseBudget) -> Harvest {
        harvest(
            entrypoint,
            files,
            budget,
            Instant::now() + Duration::from_secs(5),
        )
    }

    /// (methods, rule) pairs, sorted.
    fn rules(discovery: &Harvest) -> Vec<String> {
        let mut rules: Vec<String> = discovery
            .rules
            .iter()
            .map(|r| {
                let methods: Vec<&str> = r.methods.iter().map(String::as_str).collect();
                format!("{} {}", methods.join(","), r.rule)
            })
            .collect();
        rules.sort();
        rules
    }

    #[test]
    fn decorators_methods_and_the_static_route() {
        let files = Files::new(&[(
            "/srv/app.py",
            r#"
from flask import Flask, abort
import os

app = Flask(__name__)
ITEMS = "/items"

@app.get("/")
def index():
    return "index"

@app.route(ITEMS + "/<int:item_id>", methods=["GET", "put", "DELETE"])
def item(item_id):
    abort(404)

@app.post(f"{ITEMS}/new")
def new():
    return ""

if os.environ.get("DEBUG"):
    @app.route("/debug")
    def debug():
        return ""
"#,
        )]);
        let discovery = run(
            &files,
            &entry("app", AppObject::Variable("app".into())),
            ParseBudget::default(),
        );
        assert_eq!(
            rules(&discovery),
            [
                "DELETE,GET,PUT /items/<int:item_id>",
                "GET /",
                "GET /debug",
                "GET /static/<path:filename>",
                "POST /items/new",
            ]
        );
        assert!(
            discovery.unresolved.is_empty(),
            "{:?}",
            discovery.unresolved
        );
        let item = discovery
            .rules
            .iter()
            .find(|r| r.endpoint == "item")
            .expect("item");
        assert_eq!(
            (item.file.as_path(), item.line),
            (Path::new("/srv/app.py"), 12)
        );
    }

    #[test]
    fn a_factory_blueprints_views_and_resources_across_modules() {
        let files = Files::new(&[
            (
                "/srv/shop/__init__.py",
                r#"
from flask import Flask
from flask_restful import Api
from .views import catalog
from . import admin
from .resources import Order

API = "/api"

def create_app():
    app = Flask(__name__, static_url_path="/assets")
    app.register_blueprint(catalog)
    app.register_blueprint(admin.bp, url_prefix="/manage/")
    api = Api(app, prefix=API)
    api.add_resource(Order, "/orders/<int:order_id>", "/orders")
    return app
"#,
            ),
            (
                "/srv/shop/views.py",
                r#"
from flask import Blueprint
from flask.views import MethodView

catalog = Blueprint("catalog", __name__, url_prefix="/catalog")
tags = Blueprint("tags", __name__, url_prefix="/tags")

@tags.route("/<slug>")
def tag(slug):
    return slug

@catalog.route("/")
def home():
    return ""

class Items(MethodView):
    def get(self):
        return ""
    def post(self):
        return ""

catalog.add_url_rule("/items", view_func=Items.as_view("items"))
catalog.register_blueprint(tags)
"#,
            ),
            (
                "/srv/shop/admin.py",
                r#"
import flask
bp = flask.Blueprint("admin", __name__, url_prefix="/admin")
bp.add_url_rule("", "root", lambda: "")
@bp.route("/users")
def users():
    return ""
"#,
            ),
            (
                "/srv/shop/resources.py",
                r#"
from flask_restful import Resource
class Base(Resource):
    def get(self):
        return {}
class Order(Base):
    def delete(self):
        return {}
"#,
            ),
        ]);
        let discovery = run(
            &files,
            &entry("shop", AppObject::Factory("create_app".into())),
            ParseBudget::default(),
        );
        assert_eq!(
            rules(&discovery),
            [
                "DELETE,GET /api/orders",
                "DELETE,GET /api/orders/<int:order_id>",
                "GET /assets/<path:filename>",
                "GET /catalog/",
                "GET /catalog/tags/<slug>",
                // Flask: an empty rule is the prefix itself, as given.
                "GET /manage/",
                "GET /manage/users",
                "GET,POST /catalog/items",
            ]
        );
        assert!(
            discovery.unresolved.is_empty(),
            "{:?}",
            discovery.unresolved
        );
        assert_eq!(discovery.files.len(), 4);
        let tag = discovery
            .rules
            .iter()
            .find(|r| r.rule == "/catalog/tags/<slug>")
            .expect("tag");
        // A nested blueprint's endpoints carry its parent's name, as Flask names them.
        assert_eq!(tag.endpoint, "catalog.tags.tag");
        assert_eq!(tag.file, PathBuf::from("/srv/shop/views.py"));
    }

    #[test]
    fn what_cannot_be_followed_is_said_and_budgets_hold() {
        let files = Files::new(&[
            (
                "/srv/app.py",
                r#"
from flask import Flask
from .helpers import prefix
import extra
app = Flask(__name__, static_folder=None)
@app.route(prefix() + "/x")
def x():
    return ""
@app.route("/ok")
def ok():
    return ""
"#,
            ),
            ("/srv/extra.py", "X = 1\n"),
        ]);
        let discovery = run(
            &files,
            &entry("app", AppObject::Default),
            ParseBudget::default(),
        );
        assert_eq!(rules(&discovery), ["GET /ok"]);
        assert_eq!(discovery.unresolved.len(), 1, "{:?}", discovery.unresolved);
        assert!(
            discovery.unresolved[0]
                .starts_with("/srv/app.py:6: a rule that is not a constant string")
        );

        // One file's budget: the module it imports is not read.
        let one_file = ParseBudget {
            files: 1,
            ..ParseBudget::default()
        };
        let discovery = run(&files, &entry("app", AppObject::Default), one_file);
        assert_eq!(discovery.files.len(), 1);
        assert!(discovery.budget_spent);
        assert!(
            discovery
                .unresolved
                .iter()
                .any(|u| u.starts_with("parse budget spent"))
        );
    }

    /// Runs `test` on a stack as deep as the helper's harvest thread has.
    fn on_helper_stack(test: impl FnOnce() + Send + 'static) {
        std::thread::Builder::new()
            .stack_size(64 * 1024 * 1024)
            .spawn(test)
            .expect("thread")
            .join()
            .expect("the harvest finished");
    }

    fn app_with(tail: &str) -> Files {
        let source = format!(
            "from flask import Flask, Blueprint\napp = Flask(__name__)\n\n@app.get(\"/ok\")\ndef ok():\n    return \"ok\"\n\n{tail}"
        );
        Files(HashMap::from([(PathBuf::from("/srv/app.py"), source)]))
    }

    fn harvest_of(files: &Files) -> Harvest {
        run(
            files,
            &entry("app", AppObject::Default),
            ParseBudget::default(),
        )
    }

    fn said(discovery: &Harvest, words: &str) -> bool {
        discovery.unresolved.iter().any(|u| u.contains(words))
    }

    /// What an image author can write to make a harvest run away: each
    /// stops at its bound, says so, and keeps the rules before it.
    #[test]
    fn hostile_sources_stop_at_their_bounds() {
        on_helper_stack(|| {
            // Registered into itself (never run: under `if False`), and a cycle.
            let own = harvest_of(&app_with(
                "bp = Blueprint(\"bp\", __name__)\n@bp.get(\"/b\")\ndef b():\n    return \"b\"\nif False:\n    app.register_blueprint(app)\n    bp.register_blueprint(bp)\napp.register_blueprint(bp, url_prefix=\"/bp\")\n",
            ));
            assert_eq!(
                rules(&own),
                ["GET /bp/b", "GET /ok", "GET /static/<path:filename>"]
            );
            assert!(
                said(&own, "is registered into itself"),
                "{:?}",
                own.unresolved
            );
            let cycle = harvest_of(&app_with(
                "a = Blueprint(\"a\", __name__)\nb = Blueprint(\"b\", __name__)\na.register_blueprint(b)\nb.register_blueprint(a)\napp.register_blueprint(a)\n",
            ));
            assert!(
                said(&cycle, "is registered into itself"),
                "{:?}",
                cycle.unresolved
            );
            assert!(rules(&cycle).contains(&"GET /ok".to_owned()));

            // Blueprints registering the next one twice, 40 deep: 2^40
            // registrations without a rule, unless bounded.
            let mut tail = String::new();
            for n in 0..40 {
                tail.push_str(&format!("b{n} = Blueprint(\"b{n}\", __name__)\n"));
            }
            for n in 0..39 {
                let next = n + 1;
                tail.push_str(&format!(
                    "b{n}.register_blueprint(b{next}, name=\"x{n}\")\nb{n}.register_blueprint(b{next}, name=\"y{n}\")\n"
                ));
            }
            tail.push_str("app.register_blueprint(b0)\n");
            let doubling = harvest_of(&app_with(&tail));
            assert!(
                said(&doubling, "blueprint registrations"),
                "{:?}",
                doubling.unresolved
            );

            // A left-deep sum of 20,000 terms, lists nested 500 deep, and an
            // import of 500 components: nesting bounds.
            let sum = format!("X = {}\n", vec!["\"a\""; 20_000].join(" + "));
            let deep = harvest_of(&app_with(&sum));
            assert!(said(&deep, "nested deeper than"), "{:?}", deep.unresolved);
            assert_eq!(rules(&deep), ["GET /ok", "GET /static/<path:filename>"]);
            let lists = format!("X = {}1{}\n", "[".repeat(500), "]".repeat(500));
            assert!(said(&harvest_of(&app_with(&lists)), "nested deeper than"));
            let import = format!("import {}\n", vec!["a"; 500].join("."));
            let files = Files(HashMap::from([
                (
                    PathBuf::from("/srv/app.py"),
                    format!("from flask import Flask\napp = Flask(__name__)\n{import}"),
                ),
                (PathBuf::from("/srv/a/__init__.py"), String::new()),
            ]));
            assert!(said(&harvest_of(&files), "nested deeper than"));

            // A string doubled 40 times, and an f-string of it.
            let mut doubling = String::from("s = \"aaaa\"\n");
            for _ in 0..40 {
                doubling.push_str("s = s + s\n");
            }
            doubling.push_str("t = f\"{s}{s}\"\n@app.get(s)\ndef never():\n    return \"\"\n");
            let strings = harvest_of(&app_with(&doubling));
            assert!(
                said(&strings, "a string over 65536 bytes"),
                "{:?}",
                strings.unresolved
            );
            assert_eq!(rules(&strings), ["GET /ok", "GET /static/<path:filename>"]);
        });
    }

    /// A factory calling functions that call each other many times over,
    /// eight deep: the deadline, checked at every statement, ends it. The
    /// factory never returned its app, so no rule is known.
    #[test]
    fn nested_calls_end_at_the_deadline() {
        on_helper_stack(|| {
            let mut tail = String::from("def f8():\n    return None\n");
            for n in (1..8).rev() {
                let next = n + 1;
                tail.push_str(&format!("def f{n}():\n"));
                for _ in 0..60 {
                    tail.push_str(&format!("    f{next}()\n"));
                }
                tail.push_str("    return None\n");
            }
            tail.push_str("def create_app():\n    f1()\n    return app\n");
            let files = app_with(&tail);
            let started = Instant::now();
            let discovery = harvest(
                &entry("app", AppObject::Factory("create_app".to_owned())),
                &files,
                ParseBudget::default(),
                Instant::now() + Duration::from_millis(300),
            );
            let took = started.elapsed();
            assert!(took < Duration::from_secs(2), "took {took:?}");
            assert!(discovery.budget_spent, "{:?}", discovery.unresolved);
            assert!(rules(&discovery).is_empty());
        });
    }
}
