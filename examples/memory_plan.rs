//! Prints the memory plan of every method for a model and batch size, without a GPU:
//! `cargo run --release --example memory_plan -- vit_b16 8 [none|norms|attention|block]`
use snella::model::{plan, Recompute, ViTConfig};
use snella::peft::Method;
use snella::Pool;

fn main() -> snella::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = args.get(1).map(String::as_str).unwrap_or("vit_b16");
    let batch: usize = args.get(2).and_then(|b| b.parse().ok()).unwrap_or(8);
    let cfg = ViTConfig::by_name(model, 100)?;
    let recompute = match args.get(3).map(String::as_str) {
        Some("none") => Recompute::None,
        Some("norms") => Recompute::Norms,
        Some("block") => Recompute::Block,
        _ => Recompute::Attention,
    };
    for name in ["full", "linear", "lora8", "gps", "snell32", "snella32"] {
        let method = Method::parse(name, 0.5)?;
        let plan = plan(&cfg, &method, batch, recompute)?;
        println!("== {model} {name} batch {batch}\n{}", plan.table());
        if name == "snella32" && std::env::var_os("SNELLA_PLAN_TENSORS").is_some() {
            for pool in Pool::ALL {
                print!("{}", plan.tensor_table(pool));
            }
        }
    }
    Ok(())
}
