//! What the kernel programs cost, as the kernel counts it: runs and run
//! time per program. The kernel keeps run time only while
//! `kernel.bpf_stats_enabled` is 1 (a sysctl the node's owner sets, which
//! adds a little to every run), so these stay at zero otherwise.

use aya::Ebpf;
use prometheus::{CounterVec, IntCounterVec, Opts, Registry};
use tracing::debug;

#[derive(Clone, Debug)]
pub(super) struct ProgramStats {
    runs: IntCounterVec,
    seconds: CounterVec,
}

impl ProgramStats {
    pub(super) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let runs = IntCounterVec::new(
            Opts::new(
                "flask_ebpf_exporter_bpf_program_runs_total",
                "Runs of each of the agent's kernel programs, while kernel.bpf_stats_enabled is 1",
            ),
            &["program"],
        )?;
        let seconds = CounterVec::new(
            Opts::new(
                "flask_ebpf_exporter_bpf_program_run_seconds_total",
                "Time spent in each of the agent's kernel programs, while \
                 kernel.bpf_stats_enabled is 1: their cost to the node's processes",
            ),
            &["program"],
        )?;
        registry.register(Box::new(runs.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        Ok(ProgramStats { runs, seconds })
    }

    /// Brings the counters up to what the kernel counts now.
    pub(super) fn sync(&self, ebpf: &Ebpf) {
        for (name, program) in ebpf.programs() {
            let info = match program.info() {
                Ok(info) => info,
                Err(error) => {
                    debug!(%error, program = name, "no run statistics for a kernel program");
                    continue;
                }
            };
            let runs = self.runs.with_label_values(&[name]);
            let total_runs = info.run_count();
            if total_runs > runs.get() {
                runs.inc_by(total_runs - runs.get());
            }
            let seconds = self.seconds.with_label_values(&[name]);
            let total_seconds = info.run_time().as_secs_f64();
            if total_seconds > seconds.get() {
                seconds.inc_by(total_seconds - seconds.get());
            }
        }
    }
}
