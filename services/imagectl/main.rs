//! `imagectl`: the command-line client. All of it lives in the `imagefleet-imagectl` crate.

fn main() -> std::process::ExitCode {
    imagefleet_imagectl::main()
}
