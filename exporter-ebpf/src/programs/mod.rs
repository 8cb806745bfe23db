//! The kernel programs, one module per hook family. Each program filters
//! and copies; userspace parses.
//!
//! Where a byte goes: [`accept`] starts following a connection, [`io`]
//! copies what its reads and writes moved into the ring buffer ([`maps`]),
//! [`close`] ends it; [`tcp`] times handshakes for the accept, and
//! [`control`] applies userspace's verdicts. Every `unsafe` read of kernel
//! or user memory goes through [`kernel`]'s safe helpers.

mod accept;
mod buffers;
mod close;
mod control;
mod io;
mod kernel;
mod maps;
mod tcp;
