// Thousands of tasks allocate small, short-lived buffers (JSON, HTTP, plugin
// stores) on every thread; glibc's allocator spent a fifth of the server's
// CPU on them in the slow-LLM benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(opspawn::cli::run_process());
}
