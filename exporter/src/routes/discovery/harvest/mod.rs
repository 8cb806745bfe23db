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
//!
//! Here: the values the evaluator knows, the harvest's entry and bounds.
//! `evaluator.rs` follows statements and expressions, `flask_api.rs` is
//! Flask's registration API, `modules.rs` finds and parses the app's
//! modules.

mod evaluator;
mod flask_api;
mod modules;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    path::PathBuf,
    rc::Rc,
    time::Instant,
};

use ruff_python_ast::{self as ast};

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

    // ------------------------------------------------------------ statements

    // ------------------------------------------------------------ expressions

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
    use std::{path::Path, time::Duration};

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
