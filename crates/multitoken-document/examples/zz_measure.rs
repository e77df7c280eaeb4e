fn main() {
    let path = std::env::args().nth(1).unwrap();
    let mut config = multitoken_document::ExtractConfig::default();
    config.max_bytes = 1 << 30;
    if let Ok(p) = std::env::var("MAXPAGES") { config.max_pages = p.parse().unwrap(); }
    let t = std::time::Instant::now();
    match multitoken_document::extract_item(&multitoken_core::Item::Path(path.into()), &config) {
        Ok(text) => {
            println!("ok {} bytes of text in {:?}", text.len(), t.elapsed());
            if std::env::args().nth(2).is_some() {
                let enc = multitoken_document::SentenceEncoder::load(multitoken_document::default_minilm_dir(), &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
                let ids = enc.tokenize(&text).unwrap();
                println!("{} tokens in {:?}", ids.len(), t.elapsed());
            }
        }
        Err(e) => println!("error: {e}"),
    }
}
