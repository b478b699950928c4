//! `sqlx::migrate!` embeds the migrations at compile time; without this, a
//! new migration file could be left out of a binary that nothing else made
//! cargo rebuild.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
