fn main() {
    let steps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let m = stages::model::ModelConfig::default();
    let t = stages::train::TrainConfig::default();
    let r = stages::train::bench::bench_train(&m, &t, &candle_core::Device::Cpu, 64, 2, steps).expect("bench");
    println!("{}", serde_json::to_string(&r).expect("json"));
}
