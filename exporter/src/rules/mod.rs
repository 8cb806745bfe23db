//! Flask's url rules as data every stage may hold: compiled from their
//! text (flags, a pod's annotation, an app's source) and matched the way
//! Werkzeug's router matches them ([`flask`]), with the memory of their
//! regexes bounded ([`regexes`]). It uses no stage: attribution compiles a
//! pod's rules, the hand-off carries them, the routes stage matches them.

mod converters;
mod error;
pub mod flask;
mod parts;
pub mod regexes;
