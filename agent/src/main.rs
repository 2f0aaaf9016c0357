fn main() {
    println!("{}", rampart::EBPF_OBJECT.len());
}
