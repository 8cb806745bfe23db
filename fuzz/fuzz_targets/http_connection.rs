//! The HTTP stage in both directions, on any bytes split anyhow, with
//! bytes not copied, lost events and failed writes in between.
#![no_main]

use arbitrary::Arbitrary;
use flask_ebpf_exporter::http::{HttpConnection, HttpCounters, Segment};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Step {
    Read { bytes: Vec<u8>, uncopied: u16 },
    Write { bytes: Vec<u8>, uncopied: u16 },
    FailedWrite { bytes: Vec<u8> },
    Gap,
    Expire,
}

fn segment(bytes: &[u8], uncopied: u16, clock: u64) -> Segment<'_> {
    Segment {
        timestamp_ns: clock,
        byte_count: bytes.len() as u64 + u64::from(uncopied),
        captured: bytes,
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let counters = HttpCounters::register(&prometheus::Registry::new()).expect("counters");
    let mut connection = HttpConnection::new();
    let mut out = Vec::new();
    for (clock, step) in (1u64..).zip(&steps) {
        match step {
            Step::Read { bytes, uncopied } => {
                connection.on_read(segment(bytes, *uncopied, clock), &counters)
            }
            Step::Write { bytes, uncopied } => {
                connection.on_write(segment(bytes, *uncopied, clock), &counters, &mut out)
            }
            Step::FailedWrite { bytes } => {
                let attempted = Segment {
                    timestamp_ns: clock,
                    byte_count: 0,
                    captured: bytes,
                };
                connection.on_write_failed(attempted, &counters, &mut out)
            }
            Step::Gap => connection.on_gap(&counters),
            Step::Expire => connection.expire_unframed(clock, 1, &counters, &mut out),
        }
        assert!(connection.pending_requests() <= 256);
        assert!(
            connection
                .partial_heads()
                .is_none_or(|(bytes, _)| bytes <= 2 * 64 * 1024)
        );
    }
    connection.on_close(&counters, &mut out);
    assert_eq!(connection.pending_requests(), 0);
});
