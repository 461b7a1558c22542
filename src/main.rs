//! `madtech`: one executable for the whole suite. See `madtech --help`.

/// mimalloc instead of the system allocator: protobuf decoding and SQL
/// statement building allocate per field, and glibc's malloc was a fifth of
/// the CPU time of event ingestion (see docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    madtech::cli::main().await
}
