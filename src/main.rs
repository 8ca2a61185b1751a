fn main() {
    std::process::exit(dsflash::cli::main());
}
