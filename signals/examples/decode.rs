//! Decodes a consent signal given on the command line and prints it as JSON:
//! `cargo run -p madtech-signals --example decode -- 'DBABTA~1YNN'`.

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(input) = args.next() else {
        eprintln!("usage: decode SIGNAL [tcf|gpp|usp]");
        std::process::exit(2);
    };
    let kind = match args.next().map(|kind| kind.parse()) {
        Some(Ok(kind)) => Some(kind),
        Some(Err(error)) => {
            eprintln!("{error}");
            std::process::exit(2);
        }
        None => None,
    };
    match madtech_signals::decode(&input, kind) {
        Ok(signal) => match serde_json::to_string_pretty(&signal) {
            Ok(json) => println!("{json}"),
            Err(error) => eprintln!("cannot serialize: {error}"),
        },
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(1);
        }
    }
}
