//! Records as they come out of the ring buffer: any bytes decode to an
//! event whose copied bytes lie inside the record, or to an error.
#![no_main]

use flask_ebpf_exporter::capture::decode_event;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|record: &[u8]| {
    if let Ok(event) = decode_event(record) {
        assert!(event.data.len() <= record.len());
        assert_eq!(event.data.len(), event.header.captured_len as usize);
    }
});
