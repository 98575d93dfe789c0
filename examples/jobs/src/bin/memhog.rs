//! Allocates memory in 1 MiB chunks, touching every page, until allocation
//! fails (which aborts: a trap). The executor's memory limit must stop it.
fn main() {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; 1 << 20];
        for i in (0..chunk.len()).step_by(4096) {
            chunk[i] = 1;
        }
        chunks.push(std::hint::black_box(chunk));
        if chunks.len() % 64 == 0 {
            eprintln!("memhog: {} MiB", chunks.len());
        }
    }
}
