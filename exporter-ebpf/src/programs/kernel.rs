//! Safe helpers around the reads a program makes of the kernel, of the
//! traced task's memory and of tracepoint records. Every one fails cleanly:
//! the BPF helpers behind them return an error on a bad address.

use aya_ebpf::{
    EbpfContext as _,
    bindings::pt_regs,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_task_btf, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_user, bpf_probe_read_user_buf, bpf_task_pt_regs,
    },
    programs::TracePointContext,
};
use exporter_common::SocketOffsets;

/// Offsets in the syscall tracepoint records (see
/// /sys/kernel/tracing/events/syscalls/*/format): arguments are 8 bytes each
/// from offset 16; the return value of a sys_exit_* record is at 16.
const ARG0: usize = 16;
const RET: usize = 16;

/// Nanoseconds since boot (CLOCK_MONOTONIC).
#[inline(always)]
pub(super) fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The current task's cgroup v2 id.
#[inline(always)]
pub(super) fn current_cgroup() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_get_current_cgroup_id() }
}

/// A sys_enter_* record's first argument.
#[inline(always)]
pub(super) fn first_argument(ctx: &TracePointContext) -> Option<u64> {
    // SAFETY: ARG0 is inside every sys_enter_* record; the helper checks
    // the read.
    unsafe { ctx.read_at::<u64>(ARG0) }.ok()
}

/// A sys_exit_* record's return value.
#[inline(always)]
pub(super) fn return_value(ctx: &TracePointContext) -> Option<i64> {
    // SAFETY: RET is inside every sys_exit_* record; the helper checks the
    // read.
    unsafe { ctx.read_at::<i64>(RET) }.ok()
}

/// The aligned u64 at `offset` of a tracepoint's record, loaded directly
/// (a tracepoint's context may be read without a helper): for programs
/// that run at every event of a busy hook.
#[inline(always)]
pub(super) fn record_word<const OFFSET: usize>(ctx: &TracePointContext) -> u64 {
    const { assert!(OFFSET % 8 == 0, "an aligned word") };
    let record = ctx.as_ptr() as *const u64;
    // SAFETY: callers pass offsets inside their tracepoint's record (see
    // its format file), 8-byte aligned as asserted above.
    unsafe { core::ptr::read(record.add(OFFSET / 8)) }
}

/// The syscall's first three arguments, read at its exit from the registers
/// the task entered the kernel with (x86_64: rdi, rsi, rdx; the kernel
/// leaves them as they were). This spares an enter program and a map entry
/// per syscall.
#[inline(always)]
pub(super) fn syscall_args() -> Option<[u64; 3]> {
    // SAFETY: the current task's BTF pointer is what bpf_task_pt_regs
    // takes; the registers are then read through bpf_probe_read_kernel,
    // which fails cleanly.
    let [rdx, rsi, rdi] = unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
        // rdx, rsi and rdi sit next to each other in pt_regs.
        bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rdx) as *const [u64; 3])
    }
    .ok()?;
    Some([rdi, rsi, rdx])
}

/// A `T` at `address` in the traced task's memory.
#[inline(always)]
pub(super) fn read_user<T>(address: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_user fails cleanly on a bad address.
    unsafe { bpf_probe_read_user(address as *const T) }.ok()
}

/// Fills `destination` from `address` in the traced task's memory.
#[inline(always)]
pub(super) fn read_user_into(address: u64, destination: &mut [u8]) -> bool {
    // SAFETY: as in `read_user`; the helper writes only `destination`.
    unsafe { bpf_probe_read_user_buf(address as *const u8, destination) }.is_ok()
}

/// A `T` at `address` in kernel memory.
#[inline(always)]
fn read_kernel<T>(address: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel fails cleanly on a bad address.
    unsafe { bpf_probe_read_kernel(address as *const T) }.ok()
}

/// A pointer-sized kernel value at `address`; `None` when unreadable or
/// null.
#[inline(always)]
fn read_kernel_pointer(address: u64) -> Option<u64> {
    read_kernel::<u64>(address).filter(|&value| value != 0)
}

/// The `struct sock` behind the current task's `fd`: task → files → fdt →
/// fd[fd] → file → socket → sk. `None` when the offsets are unknown or a
/// read failed.
#[inline(always)]
pub(super) fn socket_of(offsets: &SocketOffsets, fd: u32) -> Option<u64> {
    if offsets.socket_sk == 0 {
        return None;
    }
    // SAFETY: a helper without arguments; the pointer is only read through
    // bpf_probe_read_kernel, with offsets from this kernel's BTF.
    let task = unsafe { bpf_get_current_task_btf() } as u64;
    let files = read_kernel_pointer(task + offsets.task_files as u64)?;
    let table = read_kernel_pointer(files + offsets.files_fdt as u64)?;
    let max_fds = read_kernel::<u32>(table + offsets.fdtable_max_fds as u64)?;
    if fd >= max_fds {
        return None;
    }
    let descriptors = read_kernel_pointer(table + offsets.fdtable_fd as u64)?;
    let file = read_kernel_pointer(descriptors + fd as u64 * 8)?;
    let socket = read_kernel_pointer(file + offsets.file_private_data as u64)?;
    read_kernel_pointer(socket + offsets.socket_sk as u64)
}

/// The local port of `sock` (0 when unreadable).
#[inline(always)]
pub(super) fn local_port(offsets: &SocketOffsets, sock: u64) -> u32 {
    read_kernel::<u16>(sock + offsets.sock_num as u64).map_or(0, u32::from)
}
