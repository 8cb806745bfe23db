//! Randomized requests for tests/fixtures/routes_app.py: every rule with
//! random values of its converters' types, plus what a real app also gets:
//! wrong methods, values a converter refuses, trailing-slash variants,
//! repeated slashes, percent-encoding, query strings and unmatched paths.

use std::io::Write as _;

use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

/// A header no output may ever show.
pub const SECRET_HEADER: &str = "X-Api-Key: hunter2-header-secret";

/// Sends `request` on a connection of its own, with a cookie and
/// [`SECRET_HEADER`] no output may show; returns the status.
pub fn send(port: u16, request: &Request) -> u16 {
    let mut stream = super::connect(port);
    let body = if matches!(request.method, "POST" | "PUT") {
        "Content-Length: 2\r\n\r\n{}"
    } else {
        "\r\n"
    };
    let text = format!(
        "{} {} HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\nCookie: session=cookie-secret\r\n{SECRET_HEADER}\r\n{body}",
        request.method, request.target
    );
    stream.write_all(text.as_bytes()).expect("send");
    super::read_response(&mut stream, &mut Vec::new(), request.method)
        .expect("response")
        .status
}

/// One request: method and target (path with its query string).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: &'static str,
    pub target: String,
}

pub struct Traffic {
    rng: StdRng,
}

fn word(rng: &mut StdRng) -> String {
    const SYLLABLES: [&str; 12] = [
        "ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po", "qu", "dr",
    ];
    let count = rng.random_range(1..=4);
    (0..count)
        .map(|_| *SYLLABLES.choose(rng).unwrap_or(&"x"))
        .collect()
}

/// A random UUID in its canonical text form.
pub fn uuid(rng: &mut StdRng) -> String {
    let hex = |rng: &mut StdRng, n: usize| -> String {
        (0..n)
            .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0'))
            .collect()
    };
    format!(
        "{}-{}-{}-{}-{}",
        hex(rng, 8),
        hex(rng, 4),
        hex(rng, 4),
        hex(rng, 4),
        hex(rng, 12)
    )
}

impl Traffic {
    pub fn new(seed: u64) -> Traffic {
        Traffic {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// A request the app's rules are meant to serve (by rule index, so tests
    /// can ask for one rule's traffic).
    pub fn for_rule(&mut self, rule: usize) -> Request {
        let rng = &mut self.rng;
        let int = rng.random_range(0..1500);
        let (methods, target): (&[&'static str], String) = match rule {
            0 => (&["GET", "HEAD"], "/".to_owned()),
            1 => (&["GET"], "/health".to_owned()),
            2 => (&["GET", "POST"], "/items".to_owned()),
            3 => (&["GET"], "/items/featured".to_owned()),
            4 => (&["GET", "PUT", "DELETE"], format!("/items/{int}")),
            5 => (&["GET"], format!("/items/{int}/reviews")),
            6 => (
                &["GET"],
                format!("/items/{int}/reviews/{}", rng.random_range(1..50)),
            ),
            7 => (&["GET"], "/users/me".to_owned()),
            8 => (&["GET"], format!("/users/{}", uuid(rng))),
            9 => (
                &["GET"],
                format!("/users/{}/orders/{}", uuid(rng), rng.random_range(1..99999)),
            ),
            10 | 11 => {
                let depth = rng.random_range(1..=4);
                let path: Vec<String> = (0..depth).map(|_| word(rng)).collect();
                let suffix = if rule == 11 { "/meta" } else { "" };
                (&["GET"], format!("/files/{}.txt{suffix}", path.join("/")))
            }
            12 => (
                &["GET"],
                format!(
                    "/prices/{}.{:02}",
                    rng.random_range(0..500),
                    rng.random_range(0..100)
                ),
            ),
            13 => (&["GET"], format!("/tags/{}", word(rng))),
            14 => (&["GET"], format!("/tags/{}/related", word(rng))),
            15 => (
                &["GET"],
                format!(
                    "/blog/{}/{}-{}",
                    rng.random_range(1990..2030),
                    word(rng),
                    word(rng)
                ),
            ),
            16 => (&["GET"], "/docs/".to_owned()),
            17 => (&["GET", "POST"], "/search".to_owned()),
            18 => (
                &["GET"],
                format!("/lang/{}", ["en", "fr", "de"].choose(rng).unwrap_or(&"en")),
            ),
            19 => (&["GET"], format!("/reports/{}", rng.random_range(1..=12))),
            _ => (&["GET"], "/".to_owned()),
        };
        let method = methods.choose(rng).copied().unwrap_or("GET");
        Request {
            method,
            target: self.with_query(target),
        }
    }

    /// Rules `for_rule` knows.
    pub const RULES: usize = 20;

    fn with_query(&mut self, target: String) -> String {
        if self.rng.random_bool(0.3) {
            format!(
                "{target}?token=secret-{}&page={}",
                self.rng.random_range(0..1000),
                self.rng.random_range(1..9)
            )
        } else {
            target
        }
    }

    /// What no rule serves as asked: Flask has no url_rule for these.
    pub fn off_rule(&mut self) -> Request {
        let rng = &mut self.rng;
        let (method, target): (&'static str, String) = match rng.random_range(0..11) {
            0 => ("POST", "/health".to_owned()),
            1 => ("DELETE", "/items".to_owned()),
            2 => ("GET", "/docs".to_owned()),
            3 => ("GET", "/health/".to_owned()),
            4 => ("GET", format!("/items/{}", word(rng))),
            5 => ("GET", "/reports/13".to_owned()),
            6 => (
                "GET",
                format!("/blog/{}/{}", rng.random_range(10..99), word(rng)),
            ),
            7 => ("GET", "/lang/es".to_owned()),
            8 => ("GET", format!("/prices/{}", rng.random_range(0..100))),
            9 => ("GET", format!("/items//{}", rng.random_range(0..100))),
            _ => ("GET", format!("/{}/{}", word(rng), word(rng))),
        };
        Request {
            method,
            target: self.with_query(target),
        }
    }

    /// Percent-encoded and odd but valid requests.
    pub fn encoded(&mut self) -> Request {
        let rng = &mut self.rng;
        let target = match rng.random_range(0..3) {
            0 => "/tags/caf%C3%A9".to_owned(),
            1 => format!("/files/dir%20{}/x.txt", word(rng)),
            _ => format!("//items/{}", rng.random_range(0..100)),
        };
        Request {
            method: "GET",
            target,
        }
    }

    /// One of the rules, uniformly.
    pub fn random_rule(&mut self) -> usize {
        self.rng.random_range(0..Self::RULES)
    }

    /// A mix: mostly rule traffic, some off-rule and encoded requests.
    pub fn next_request(&mut self) -> Request {
        match self.rng.random_range(0..100) {
            0..80 => {
                let rule = self.rng.random_range(0..Self::RULES);
                self.for_rule(rule)
            }
            80..95 => self.off_rule(),
            _ => self.encoded(),
        }
    }

    /// A random URL no app knows: what a scanner sends.
    pub fn random_url(&mut self) -> Request {
        let rng = &mut self.rng;
        let depth = rng.random_range(1..=5);
        let segments: Vec<String> = (0..depth)
            .map(|_| match rng.random_range(0..4) {
                0 => rng.random_range(0..1_000_000).to_string(),
                1 => uuid(rng),
                _ => word(rng),
            })
            .collect();
        Request {
            method: "GET",
            target: format!("/{}", segments.join("/")),
        }
    }
}
