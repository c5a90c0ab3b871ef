use std::process::ExitCode;

fn main() -> ExitCode {
    iotp_core::service::run("parser", iotp_parser::run)
}
