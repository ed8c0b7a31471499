//! Print this machine's ceilings: `cargo run --release -p ferry-ceilings --example ceilings`.
fn main() -> Result<(), ferry_ceilings::CeilingError> {
    println!("{}", ferry_ceilings::measure(ferry_ceilings::Budget::default())?);
    Ok(())
}
