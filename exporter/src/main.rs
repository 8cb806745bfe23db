fn main() { println!("{}", flask_ebpf_exporter::EBPF_OBJECT.len()); }
