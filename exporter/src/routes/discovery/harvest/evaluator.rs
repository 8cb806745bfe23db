//! A small Python evaluator: statements followed in order and expressions
//! given a value only where rules depend on them (string constants,
//! f-strings of constants, names, attributes, classes, functions).
//! Flask's own API is in `flask_api.rs`.

use std::{collections::BTreeSet, rc::Rc};

use ruff_python_ast::{self as ast, Expr, Stmt};

use super::{
    Bound, Class, Context, Env, Function, HTTP_METHODS, Harvester, MAX_CALL_DEPTH,
    MAX_STRING_BYTES, MAX_STRINGS, Value,
};

impl Harvester<'_> {
    /// Runs statements; returns what a `return` gave (in a function body).
    pub(super) fn exec_block(
        &mut self,
        body: &[Stmt],
        env: &mut Env,
        context: &Context,
    ) -> Option<Value> {
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

    pub(super) fn exec(
        &mut self,
        statement: &Stmt,
        env: &mut Env,
        context: &Context,
    ) -> Option<Value> {
        if !self.enter() {
            return None;
        }
        let returned = self.exec_statement(statement, env, context);
        self.leave();
        returned
    }

    pub(super) fn exec_statement(
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

    pub(super) fn bind(&mut self, target: &Expr, value: Value, env: &mut Env) {
        if let Expr::Name(name) = target {
            env.insert(name.id.as_str().to_owned(), value);
        }
    }

    pub(super) fn class(
        &mut self,
        class: &ast::StmtClassDef,
        env: &Env,
        context: &Context,
    ) -> usize {
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

    pub(super) fn eval(&mut self, expression: &Expr, env: &Env, context: &Context) -> Value {
        if !self.enter() {
            return Value::Unknown;
        }
        let value = self.eval_expression(expression, env, context);
        self.leave();
        value
    }

    pub(super) fn eval_expression(
        &mut self,
        expression: &Expr,
        env: &Env,
        context: &Context,
    ) -> Value {
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

    pub(super) fn fstring(
        &mut self,
        fstring: &ast::ExprFString,
        env: &Env,
        context: &Context,
    ) -> Value {
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

    /// Runs a function's body (an app factory) and returns what it returns.
    pub(super) fn call_function(&mut self, function: &Rc<Function>) -> Value {
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
}
