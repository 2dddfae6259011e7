//! `imaged`: the server. All of it lives in the `imagefleet-imaged` crate.

fn main() -> std::process::ExitCode {
    imagefleet_imaged::main()
}
