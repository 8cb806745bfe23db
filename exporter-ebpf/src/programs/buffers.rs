//! Where the bytes an I/O syscall moved are in the task's memory, and the
//! copy of their first bytes into an event.

use exporter_common::{CaptureConfig, EVENT_HEADER_LEN, MAX_CAPTURE_BYTES};

use super::kernel::{read_user, read_user_into};

/// Offset of `msg_iov` in `struct user_msghdr` (after msg_name and msg_namelen).
const MSGHDR_IOV_OFFSET: u64 = 16;

/// How the user buffer of an I/O syscall is described.
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum BufferShape {
    /// A plain pointer (read, write, recvfrom, sendto).
    Flat = 0,
    /// A `struct iovec *` (readv, writev); the first iovec is captured.
    Iovec = 1,
    /// A `struct user_msghdr *` (recvmsg, sendmsg); its first iovec is captured.
    Msghdr = 2,
    /// No user buffer (sendfile): only the byte count is reported.
    None = 3,
}

/// An I/O syscall's arguments, as its exit program found them.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct IoArgs {
    pub(super) fd: u32,
    pub(super) kind: u32,
    pub(super) shape: BufferShape,
    pub(super) _pad: u32,
    pub(super) buffer: u64,
    /// Bytes asked for, for a flat buffer (read and write's count).
    pub(super) length: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

/// Where the bytes a syscall transferred are in user memory.
#[derive(Clone, Copy)]
pub(super) struct UserBuffer {
    /// 0: none known (sendfile, or an unreadable iovec).
    pub(super) address: u64,
    pub(super) length: u64,
}

const NO_BUFFER: UserBuffer = UserBuffer {
    address: 0,
    length: 0,
};

/// The user address and length of the bytes a syscall transferred. A plain
/// struct, not an `Option`: LLVM leaves a `None`'s payload undefined, and
/// the verifier refuses a program that copies an undefined register.
pub(super) fn user_buffer(args: &IoArgs) -> UserBuffer {
    match args.shape {
        BufferShape::Flat => UserBuffer {
            address: args.buffer,
            length: args.length,
        },
        BufferShape::Iovec => first_iovec(args.buffer),
        BufferShape::Msghdr => match read_user::<u64>(args.buffer + MSGHDR_IOV_OFFSET) {
            Some(iov) => first_iovec(iov),
            None => NO_BUFFER,
        },
        BufferShape::None => NO_BUFFER,
    }
}

fn first_iovec(pointer: u64) -> UserBuffer {
    match read_user::<Iovec>(pointer) {
        Some(iov) => UserBuffer {
            address: iov.base,
            length: iov.len,
        },
        None => NO_BUFFER,
    }
}

/// First four bytes of an HTTP/1.x request line, for the methods servers see.
pub(super) fn starts_like_request(prefix: [u8; 4]) -> bool {
    matches!(
        &prefix,
        b"GET " | b"POST" | b"PUT " | b"HEAD" | b"DELE" | b"PATC" | b"OPTI" | b"TRAC" | b"CONN"
    )
}

/// The part of `buffer` after its first `skipped` bytes (none when they
/// cover the buffer, or it is not a flat one the kernel knows).
#[inline(always)]
pub(super) fn past(buffer: UserBuffer, skipped: u32) -> UserBuffer {
    let skipped = skipped as u64;
    if buffer.address == 0 || skipped >= buffer.length {
        return NO_BUFFER;
    }
    UserBuffer {
        address: buffer.address + skipped,
        length: buffer.length - skipped,
    }
}

/// Copies the first bytes the syscall moved (at most the configured
/// capture size) after the header in `scratch`; returns how many.
#[inline(always)]
pub(super) fn copy_prefix(
    scratch: &mut [u8; EVENT_HEADER_LEN + MAX_CAPTURE_BYTES],
    buffer: UserBuffer,
    moved: u64,
    config: &CaptureConfig,
) -> usize {
    let UserBuffer { address, length } = buffer;
    if address == 0 {
        return 0;
    }
    let mut limit = config.capture_bytes as u64;
    if limit > moved {
        limit = moved;
    }
    if limit > length {
        limit = length;
    }
    let mut copy_len = limit as usize;
    if copy_len > MAX_CAPTURE_BYTES {
        copy_len = MAX_CAPTURE_BYTES;
    }
    if let Some(destination) = scratch.get_mut(EVENT_HEADER_LEN..EVENT_HEADER_LEN + copy_len)
        && !read_user_into(address, destination)
    {
        copy_len = 0;
    }
    copy_len
}
