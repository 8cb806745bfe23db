//! Werkzeug's converters (`int`, `float`, `string`, `path`, `any`, `uuid`,
//! `default`) with their arguments, parsed from a rule's `<name:var>` as
//! Werkzeug parses them.

use std::collections::HashMap;

/// What a converter checks after its regex matched (Werkzeug's `to_python`).
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Check {
    None,
    Number {
        fixed_digits: usize,
        min: Option<f64>,
        max: Option<f64>,
    },
}

impl Check {
    pub(super) fn accepts(&self, value: &str) -> bool {
        match self {
            Check::None => true,
            Check::Number {
                fixed_digits,
                min,
                max,
            } => {
                if *fixed_digits > 0 && value.chars().count() != *fixed_digits {
                    return false;
                }
                let Some(number) = parse_number(value) else {
                    return false;
                };
                min.is_none_or(|min| number >= min) && max.is_none_or(|max| number <= max)
            }
        }
    }
}

/// Python's int()/float() of what `\d` matched (Unicode digits included).
pub(super) fn parse_number(value: &str) -> Option<f64> {
    let ascii: String = value
        .chars()
        .map(|c| match c.to_digit(10) {
            Some(digit) => char::from_digit(digit, 10).unwrap_or(c),
            None => c,
        })
        .collect();
    ascii.parse().ok()
}

/// A converter's regex, weight, whether it stays within one segment, and
/// its check.
pub(super) struct Converter {
    pub(super) regex: String,
    pub(super) weight: i64,
    pub(super) part_isolating: bool,
    pub(super) check: Check,
}

/// Werkzeug's `parse_converter_args`: positional and keyword arguments as
/// Python literals.
pub(super) fn converter_arguments(text: &str) -> Option<(Vec<String>, HashMap<String, String>)> {
    let mut positional = Vec::new();
    let mut keywords = HashMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (item, after) = split_argument(rest)?;
        rest = after.trim_start_matches(',').trim();
        let item = item.trim();
        let value_of = |raw: &str| {
            let raw = raw.trim();
            let unquoted = raw
                .strip_prefix('"')
                .and_then(|r| r.strip_suffix('"'))
                .or_else(|| raw.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')));
            unquoted.unwrap_or(raw).to_owned()
        };
        match item.split_once('=') {
            Some((name, value))
                if !name.trim().is_empty()
                    && name.trim().chars().all(|c| c.is_alphanumeric() || c == '_') =>
            {
                keywords.insert(name.trim().to_owned(), value_of(value));
            }
            _ => positional.push(value_of(item)),
        }
    }
    Some((positional, keywords))
}

/// One argument up to the next top-level comma (quotes respected).
pub(super) fn split_argument(text: &str) -> Option<(&str, &str)> {
    let mut quote: Option<char> = None;
    for (index, c) in text.char_indices() {
        match (quote, c) {
            (Some(open), c) if c == open => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, ',') => return Some((&text[..index], &text[index..])),
            (None, _) => {}
        }
    }
    quote.is_none().then_some((text, ""))
}

pub(super) fn python_bool(value: Option<&String>) -> bool {
    value.is_some_and(|v| v == "True")
}

pub(super) fn number_limit(value: Option<&String>) -> Option<Option<f64>> {
    match value.map(String::as_str) {
        None | Some("None") => Some(None),
        Some(text) => text.parse().ok().map(Some),
    }
}

/// Why a converter could not be made.
#[derive(Clone, Copy)]
pub(super) enum ConverterError {
    Unknown,
    BadArguments,
}

pub(super) fn converter(name: &str, arguments: &str) -> Result<Converter, ConverterError> {
    let bad = ConverterError::BadArguments;
    let (positional, keywords) =
        converter_arguments(arguments).ok_or(ConverterError::BadArguments)?;
    let get = |key: &str, index: usize| keywords.get(key).or(positional.get(index));
    Ok(match name {
        "default" | "string" => {
            let length = match get("length", 2) {
                Some(length) => format!("{{{}}}", length.parse::<usize>().map_err(|_| bad)?),
                None => {
                    let min = get("minlength", 0).map_or(Ok(1), |m| m.parse::<usize>());
                    let max = get("maxlength", 1).map(|m| m.parse::<usize>());
                    let min = min.map_err(|_| bad)?;
                    match max {
                        Some(max) => format!("{{{min},{}}}", max.map_err(|_| bad)?),
                        None => format!("{{{min},}}"),
                    }
                }
            };
            Converter {
                regex: format!("[^/]{length}"),
                weight: 100,
                part_isolating: true,
                check: Check::None,
            }
        }
        "path" => Converter {
            regex: "[^/].*?".to_owned(),
            weight: 200,
            part_isolating: false,
            check: Check::None,
        },
        "any" => {
            let items: Vec<String> = positional.iter().map(|item| regex::escape(item)).collect();
            if items.is_empty() {
                return Err(bad);
            }
            Converter {
                regex: format!("(?:{})", items.join("|")),
                weight: 100,
                part_isolating: true,
                check: Check::None,
            }
        }
        "int" | "float" => {
            let digits = if name == "int" { r"\d+" } else { r"\d+\.\d+" };
            let signed = python_bool(get("signed", if name == "int" { 3 } else { 2 }));
            let fixed_digits = if name == "int" {
                get("fixed_digits", 0)
                    .map_or(Ok(0), |d| d.parse::<usize>())
                    .map_err(|_| bad)?
            } else {
                0
            };
            let (min_index, max_index) = if name == "int" { (1, 2) } else { (0, 1) };
            Converter {
                regex: if signed {
                    format!("-?{digits}")
                } else {
                    digits.to_owned()
                },
                weight: 50,
                part_isolating: true,
                check: Check::Number {
                    fixed_digits,
                    min: number_limit(get("min", min_index)).ok_or(bad)?,
                    max: number_limit(get("max", max_index)).ok_or(bad)?,
                },
            }
        }
        "uuid" => Converter {
            regex: "[A-Fa-f0-9]{8}-[A-Fa-f0-9]{4}-[A-Fa-f0-9]{4}-[A-Fa-f0-9]{4}-[A-Fa-f0-9]{12}"
                .to_owned(),
            weight: 100,
            part_isolating: true,
            check: Check::None,
        },
        _ => return Err(ConverterError::Unknown),
    })
}
