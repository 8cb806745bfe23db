//! Where the kernel side finds the socket behind a descriptor, and the
//! local port in it: member offsets of the running kernel's structures,
//! read from its BTF (`/sys/kernel/btf/vmlinux`) with the `btf-rs` crate.

use btf_rs::{Backend, Btf, Struct, Type};
use exporter_common::SocketOffsets;

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub(super) enum SocketOffsetsError {
    #[error("cannot read the kernel's BTF at {VMLINUX_BTF}: {0}")]
    Btf(#[from] btf_rs::Error),
    #[error("the kernel's BTF has no member {structure}.{member}")]
    Missing {
        structure: &'static str,
        member: &'static str,
    },
}

/// The offsets of the running kernel.
pub(super) fn socket_offsets() -> Result<SocketOffsets, SocketOffsetsError> {
    // Mapping the file avoids parsing every type; kernels that cannot map
    // it are read whole.
    let btf = Btf::from_file_with_backend(VMLINUX_BTF, Backend::Mmap)
        .or_else(|_| Btf::from_file(VMLINUX_BTF))?;
    let offset = |structure, member| member_offset(&btf, structure, member);
    Ok(SocketOffsets {
        task_files: offset("task_struct", "files")?,
        files_fdt: offset("files_struct", "fdt")?,
        fdtable_max_fds: offset("fdtable", "max_fds")?,
        fdtable_fd: offset("fdtable", "fd")?,
        file_private_data: offset("file", "private_data")?,
        socket_sk: offset("socket", "sk")?,
        // `struct sock` begins with its `sock_common`, where the port sits
        // in an anonymous union.
        sock_num: offset("sock", "__sk_common")? + offset("sock_common", "skc_num")?,
        _pad: 0,
    })
}

/// Anonymous structs and unions looked into, at most: the kernel's own
/// nest one or two deep.
const MAX_ANONYMOUS_DEPTH: usize = 4;

/// The byte offset of a non-bitfield member of a struct, directly or in
/// its anonymous structs and unions.
fn member_offset(
    btf: &Btf,
    structure: &'static str,
    member: &'static str,
) -> Result<u32, SocketOffsetsError> {
    btf.resolve_types_by_name(structure)?
        .iter()
        .find_map(|found| match found {
            Type::Struct(fields) => find_member(btf, fields, member, 0),
            _ => None,
        })
        .map(|bits| bits / 8)
        .ok_or(SocketOffsetsError::Missing { structure, member })
}

/// The bit offset of `member` in `fields`, looking into anonymous members.
fn find_member(btf: &Btf, fields: &Struct, member: &str, depth: usize) -> Option<u32> {
    fields.members.iter().find_map(|field| {
        let name = btf.resolve_name(field).ok()?;
        if name == member {
            return (field.bitfield_size().unwrap_or(0) == 0).then(|| field.bit_offset());
        }
        if !name.is_empty() || depth >= MAX_ANONYMOUS_DEPTH {
            return None;
        }
        match btf.resolve_chained_type(field).ok()? {
            Type::Struct(inner) | Type::Union(inner) => {
                find_member(btf, &inner, member, depth + 1).map(|bits| field.bit_offset() + bits)
            }
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checked against this kernel's own layout: the offsets lead from
    /// nothing to nothing unless they are right, so the figures that can be
    /// known without kernel memory are asserted.
    #[test]
    fn this_kernels_offsets_are_read() {
        let offsets = socket_offsets().expect("this kernel has BTF");
        // The first member of `struct fdtable` is `max_fds`; `fd` follows
        // it (aligned to a pointer).
        assert_eq!(offsets.fdtable_max_fds, 0);
        assert_eq!(offsets.fdtable_fd, 8);
        assert!(offsets.task_files > 0 && offsets.socket_sk > 0);
        // `skc_num` follows `skc_dport` in the union after the address
        // pair and the hash: inside the first 16 bytes of `struct sock`.
        assert_eq!(offsets.sock_num, 14);
        let btf = Btf::from_file(VMLINUX_BTF).expect("btf");
        assert!(matches!(
            member_offset(&btf, "socket", "no_such_member"),
            Err(SocketOffsetsError::Missing { .. })
        ));
    }
}
