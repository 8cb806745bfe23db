//! The app's own modules: which file a module name is, reading and
//! parsing it once (within the parse budget), and relative imports.

use std::{
    path::{Path, PathBuf},
    rc::Rc,
};

use super::{Context, Env, Harvester, MODELED_PACKAGES};

impl Harvester<'_> {
    /// The file of a dotted module on the search path (site-packages too
    /// for the installed app's own package).
    pub(super) fn module_file(&self, module: &str) -> Option<(PathBuf, bool)> {
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
    pub(super) fn load(&mut self, module: &str) -> Option<&Env> {
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
    pub(super) fn load_file(&mut self, module: &str, package: &str, file: &Path) -> bool {
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
    pub(super) fn absolute(
        &self,
        context: &Context,
        level: u32,
        module: Option<&str>,
    ) -> Option<String> {
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

    /// The context a module's functions run in.
    pub(super) fn context_of(&self, module: &str) -> Option<Context> {
        self.contexts.get(module).cloned()
    }
}
