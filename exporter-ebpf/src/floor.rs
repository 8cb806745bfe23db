//! Programs that do nothing, for the overhead benchmark only (never loaded
//! by the agent): attached where the agent's programs are, their run time
//! per request is the floor any program on those hooks pays.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        macros::{raw_tracepoint, tracepoint},
        programs::{RawTracePointContext, TracePointContext},
    };

    /// On the agent's syscall tracepoints.
    #[tracepoint]
    pub(crate) fn empty_tracepoint(_ctx: TracePointContext) -> u32 {
        0
    }

    /// On raw `sys_enter`/`sys_exit`, which run for every syscall.
    #[raw_tracepoint]
    pub(crate) fn empty_raw_tracepoint(_ctx: RawTracePointContext) -> i32 {
        0
    }
}

#[cfg(target_arch = "bpf")]
mod object;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
