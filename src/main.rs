//! `madtech`: one executable for the whole suite. See `madtech --help`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    madtech::cli::main().await
}
