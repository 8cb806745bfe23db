//! Route discovery in a process of its own: an app's source is whatever
//! its image author put there, so it is parsed by a helper started from the
//! agent's binary ([`launch`]), which holds nothing of the agent's and dies
//! alone ([`child`]), and answers in a bounded format ([`protocol`]).

pub mod child;
pub mod launch;
pub mod protocol;

pub use self::launch::{HelperOutcome, HelperProgram, harvest};
