//! The fuzz targets' runs: each parser on the fuzzer's input, every error
//! and warning checked by the oracle ([`tailguard_fuzz_oracle`]).

use std::{path::Path, sync::OnceLock};

use tailguard_fuzz_oracle::{Flag, Input, assert_no_leak, settings_arg};

/// The wg-quick parser on `data`, as it reads a file.
pub fn wgconf(data: &[u8]) {
    let run =
        |bytes: &[u8]| match tailguard::config::wg_quick::parse_bytes(bytes, Path::new("wg0.conf"))
        {
            Err(error) => vec![error.to_string(), format!("{error:?}")],
            Ok((_, warnings)) => warnings,
        };
    assert_no_leak(
        &String::from_utf8_lossy(data),
        Input::WgQuick,
        &run(data),
        |text| run(text.as_bytes()),
    );
}

/// The settings parser on an argument list made of `data`'s lines (see
/// [`settings_arg`]); its warnings include `TS_EXTRA_ARGS`' own.
pub fn settings(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    assert_no_leak(&text, Input::Settings, &settings_run(&text), settings_run);
}

/// What the settings parser says about the arguments made of `text`.
fn settings_run(text: &str) -> Vec<String> {
    let args: Vec<String> = text
        .split('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
        .filter(|line| !line.is_empty())
        .map(|line| settings_arg(line, settings_flags()))
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match tailguard::config::settings::parse_args(&args) {
        Err(error) => vec![error.to_string()],
        Ok((_, warnings)) => warnings.iter().map(ToString::to_string).collect(),
    }
}

/// The settings' flags, as clap knows them.
fn settings_flags() -> &'static [Flag] {
    static FLAGS: OnceLock<Vec<Flag>> = OnceLock::new();
    FLAGS.get_or_init(|| {
        use clap::Args as _;
        let command = tailguard::config::settings::SettingsArgs::augment_args(clap::Command::new(
            "tailguard",
        ));
        command
            .get_arguments()
            .filter_map(|arg| {
                let long = arg.get_long()?.to_string();
                let env = arg.get_env().map_or_else(
                    || long.clone(),
                    |env| env.to_string_lossy().to_ascii_lowercase().replace('_', "-"),
                );
                Some(Flag { long, env })
            })
            .collect()
    })
}

/// `TS_EXTRA_ARGS`' parser on `data`.
pub fn extra_args(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let run = |text: &str| tailguard::config::extra_args::parse_extra_args(text).1;
    assert_no_leak(&text, Input::Args, &run(&text), run);
}
