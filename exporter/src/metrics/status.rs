//! The `status` label's value. The status comes from a server's response,
//! which a tenant writes: any three digits parse. Only the codes HTTP
//! defines (100–599) get a value of their own; the rest share one, and
//! past the series budget a status is exported by its class.

use std::fmt;

/// What a response's status is exported as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StatusLabel {
    /// A code HTTP defines, 100–599: its digits.
    Code(u16),
    /// A class, `1xx` to `5xx`: a code's, past the series budget.
    Class(u8),
    /// `<other>`: a status outside 100–599.
    Other,
}

/// The value every status outside 100–599 shares.
pub const OTHER_STATUS: &str = "<other>";

impl StatusLabel {
    /// The label of a parsed status.
    pub fn of(status: u16) -> StatusLabel {
        if (100..600).contains(&status) {
            StatusLabel::Code(status)
        } else {
            StatusLabel::Other
        }
    }

    /// The same status by its class, which needs no series of its own
    /// beyond one per class.
    pub fn class(self) -> StatusLabel {
        match self {
            StatusLabel::Code(code) => StatusLabel::Class((code / 100) as u8),
            other => other,
        }
    }
}

impl fmt::Display for StatusLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusLabel::Code(code) => write!(f, "{code}"),
            StatusLabel::Class(class) => write!(f, "{class}xx"),
            StatusLabel::Other => f.write_str(OTHER_STATUS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_outside_http_share_one_value_and_classes_read_as_prometheus_users_match_them() {
        let labels: Vec<String> = [0, 99, 100, 204, 599, 600, 999]
            .map(|status| StatusLabel::of(status).to_string())
            .into();
        assert_eq!(
            labels,
            [
                "<other>", "<other>", "100", "204", "599", "<other>", "<other>"
            ]
        );
        let classes: Vec<String> = [101, 503, 700]
            .map(|status| StatusLabel::of(status).class().to_string())
            .into();
        assert_eq!(classes, ["1xx", "5xx", "<other>"]);
    }
}
