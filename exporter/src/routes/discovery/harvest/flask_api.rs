//! Flask's registration rules, as Flask applies them: `Flask(...)`,
//! `Blueprint(...)` and Flask-RESTful's `Api(...)` constructed; `route`,
//! `get`/`post`/... decorators, `add_url_rule`, `register_blueprint` and
//! `add_resource` called; their rule, methods and `strict_slashes`
//! arguments read.

use std::collections::BTreeSet;

use ruff_python_ast::{self as ast, Expr};
use ruff_text_size::Ranged;

use super::{
    Bound, Context, Env, HarvestedRule, Harvester, MAX_RULES, Scaffold, ScaffoldKind, Value,
};

impl Harvester<'_> {
    /// `app.url_map.strict_slashes = False`: rules that enter the map from
    /// then on take it as their default.
    pub(super) fn set_map_strict_slashes(
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

    /// A decorator on a view function or class named `name`.
    pub(super) fn decorate(
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
    pub(super) fn register(
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
    pub(super) fn strict_slashes(
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
    pub(super) fn rule_argument(
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
    pub(super) fn methods(
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

    pub(super) fn keyword<'e>(arguments: &'e ast::Arguments, name: &str) -> Option<&'e Expr> {
        arguments
            .keywords
            .iter()
            .find(|k| k.arg.as_ref().is_some_and(|a| a.as_str() == name))
            .map(|k| &k.value)
    }

    pub(super) fn keyword_str(
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

    pub(super) fn call(&mut self, call: &ast::ExprCall, env: &Env, context: &Context) -> Value {
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
    pub(super) fn construct(
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
}
