use clap::Parser;
use opspawn::telemetry::Telemetry;

// Thousands of tasks allocate small, short-lived buffers (JSON, HTTP, plugin
// stores) on every thread; glibc's allocator spent a fifth of the server's
// CPU on them in the slow-LLM benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    opspawn::install_tls_provider();
    // wasmtime builds an error value every time a plugin's store is dropped,
    // which is once per plugin call. With RUST_BACKTRACE=1 in the
    // environment, each of those captured a backtrace, costing more than the
    // call itself. Error values here are never printed with backtraces, so
    // they capture one only when RUST_LIB_BACKTRACE asks; panics still
    // follow RUST_BACKTRACE.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    let cli = opspawn::cli::Cli::parse();
    // Before the runtime starts: the trace exporter's client blocks, and
    // must be built and shut down outside it.
    let telemetry = Telemetry::init(cli.serves());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the async runtime");
    let code = runtime.block_on(run(cli));
    drop(runtime);
    telemetry.shutdown();
    std::process::exit(code);
}

async fn run(cli: opspawn::cli::Cli) -> i32 {
    match opspawn::cli::main(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            2
        }
    }
}
