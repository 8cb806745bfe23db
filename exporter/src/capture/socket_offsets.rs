//! Where the kernel side finds the socket an accept returned: member
//! offsets of the running kernel's structures, read from its BTF
//! (`/sys/kernel/btf/vmlinux`) with the `btf-rs` crate.

use btf_rs::{Backend, Btf, Type};
use exporter_common::SocketOffsets;

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum SocketOffsetsError {
    #[error("cannot read the kernel's BTF at {VMLINUX_BTF}: {0}")]
    Btf(#[from] btf_rs::Error),
    #[error("the kernel's BTF has no member {structure}.{member}")]
    Missing {
        structure: &'static str,
        member: &'static str,
    },
}

/// The offsets of the running kernel.
pub fn socket_offsets() -> Result<SocketOffsets, SocketOffsetsError> {
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
    })
}

/// The byte offset of a direct, non-bitfield member of a struct.
fn member_offset(
    btf: &Btf,
    structure: &'static str,
    member: &'static str,
) -> Result<u32, SocketOffsetsError> {
    let types = btf.resolve_types_by_name(structure)?;
    types
        .iter()
        .filter_map(|found| match found {
            Type::Struct(fields) => Some(fields),
            _ => None,
        })
        .flat_map(|fields| fields.members.iter())
        .find(|field| {
            field.bitfield_size().unwrap_or(0) == 0
                && btf.resolve_name(*field).is_ok_and(|name| name == member)
        })
        .map(|field| field.bit_offset() / 8)
        .ok_or(SocketOffsetsError::Missing { structure, member })
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
        let btf = Btf::from_file(VMLINUX_BTF).expect("btf");
        assert!(matches!(
            member_offset(&btf, "socket", "no_such_member"),
            Err(SocketOffsetsError::Missing { .. })
        ));
    }
}
