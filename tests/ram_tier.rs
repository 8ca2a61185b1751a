//! `--ram`: routed experts held in RAM up to a budget, the others read from the files when
//! selected. The bytes are the same, so logits and generated ids are the same to the bit as
//! through the map, for every budget from no expert per layer to all of them, on the models
//! with goldens and on the simulated device.

mod common;
use common::*;

/// (bytes of the main layers' routed experts, of everything else) in a checkpoint's files.
fn sizes(dir: &std::path::Path) -> (u64, u64) {
    let (mut experts, mut other) = (0u64, 0u64);
    for f in std::fs::read_dir(dir).unwrap().flatten() {
        let p = f.path();
        if p.extension().is_none_or(|x| x != "safetensors") || p.ends_with("goldens.safetensors") {
            continue;
        }
        let (h, _) = read_shard(&p);
        for (name, t) in h.as_object().unwrap() {
            let Some(off) = t.get("data_offsets") else {
                continue;
            };
            let n = off[1].as_u64().unwrap() - off[0].as_u64().unwrap();
            if name.starts_with("layers.") && name.contains(".ffn.experts.") {
                experts += n;
            } else {
                other += n;
            }
        }
    }
    (experts, other)
}

fn config(dir: &std::path::Path) -> (u64, u64) {
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    (
        c["num_hidden_layers"].as_u64().unwrap(),
        c["n_routed_experts"].as_u64().unwrap(),
    )
}

/// The greedy one-shot on tiny-vocab ("Hello there", `n` tokens, `--json`) with `extra`.
fn one_shot(n: &str, extra: &[&str]) -> std::process::Output {
    let (dir, tok) = (fixture("tiny-vocab"), tokenizer_path());
    let mut args = vec![
        "--model",
        dir.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "-p",
        "Hello there",
        "-n",
        n,
        "--temperature",
        "0",
        "--no-think",
        "--no-cache",
        "--json",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn every_ram_budget_gives_the_same_bits_as_the_map() {
    let out = tempfile::tempdir().unwrap();
    for model in ["tiny", "tiny-b", "tiny-c"] {
        let dir = fixture(model);
        let (layers, n) = config(&dir);
        let (experts, other) = sizes(&dir);
        let per_expert = experts / (layers * n);
        let d = dir.to_str().unwrap();
        let logits = |extra: &[&str], name: &str| {
            let path = out.path().join(format!("{model}-{name}.npy"));
            let mut args = vec![
                "logits",
                "--model",
                d,
                "--tokens",
                "1,2,3,4,5,6,7,8,9,10,11,12",
                "--positions",
                "all",
                "--prefill-chunk",
                "5",
                "--out",
                path.to_str().unwrap(),
            ];
            args.extend_from_slice(extra);
            let o = run(&args);
            assert!(o.status.success(), "{model} {extra:?}: {}", stderr(&o));
            (std::fs::read(&path).unwrap(), stderr(&o))
        };
        let generate = |extra: &[&str]| {
            let mut args = vec![
                "generate",
                "--model",
                d,
                "--tokens",
                "1,2,3,4,5",
                "--max-tokens",
                "8",
                "--ignore-eos",
                "--temperature",
                "0",
                "--format",
                "ids",
            ];
            args.extend_from_slice(extra);
            let o = run(&args);
            assert!(o.status.success(), "{model} {extra:?}: {}", stderr(&o));
            stdout(&o)
        };
        let (mapped, _) = logits(&[], "mapped");
        let mapped_ids = generate(&[]);
        for held in [0, 1, 2, n / 2, n - 1, n] {
            // The budget for `held` experts per layer (and a few bytes more, not a whole one).
            let budget = (other + held * layers * per_expert + per_expert / 2).to_string();
            let (got, err) = logits(&["--ram", &budget], &format!("ram{held}"));
            assert!(
                err.contains(&format!(
                    "{held} of {n} routed experts per layer held in RAM"
                )),
                "{model}, {held} per layer: {err}"
            );
            assert!(
                got == mapped,
                "{model}: logits differ with {held} experts per layer in RAM"
            );
            assert_eq!(generate(&["--ram", &budget]), mapped_ids, "{model}, {held}");
        }
        // On the simulated device too (its misses run on the CPU from the tier).
        for cap in ["sim:1M", "sim:4M"] {
            let on_dev = generate(&["--device", cap]);
            for held in [0, 1, n] {
                let budget = (other + held * layers * per_expert).to_string();
                assert_eq!(
                    generate(&["--device", cap, "--ram", &budget]),
                    on_dev,
                    "{model} {cap}, {held}"
                );
            }
        }
    }
}

#[test]
fn json_reports_selections_from_ram_and_from_the_files() {
    let dir = fixture("tiny-vocab");
    let (layers, n) = config(&dir);
    let ask = |budget: &str| {
        let o = one_shot("12", &["--ram", budget]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        (
            v["ram_tier"]["hits"].as_u64().unwrap(),
            v["ram_tier"]["reads"].as_u64().unwrap(),
            v["answer"].clone(),
        )
    };
    // Nothing held: every selection is a read.
    let (hits, reads, answer) = ask("0");
    assert_eq!(hits, 0);
    assert!(reads > 0);
    // Everything held: each expert is read once at most, later selections are hits.
    let (hits, reads_all, same) = ask("1T");
    assert!(reads_all <= layers * n, "{reads_all}");
    assert_eq!(hits + reads_all, reads, "the same selections either way");
    assert!(hits > 0);
    assert_eq!(answer, same);
}

#[test]
fn ram_off_and_auto_keep_the_map_when_the_weights_fit_and_bad_values_are_usage_errors() {
    let ask = |ram: &[&str]| one_shot("4", ram);
    // A tiny model fits in any machine's available RAM: `auto` (the default) maps it all.
    for ram in [&[][..], &["--ram", "auto"], &["--ram", "off"]] {
        let o = ask(ram);
        assert!(o.status.success(), "{ram:?}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert!(v["ram_tier"].is_null(), "{ram:?}: {v}");
        assert!(!stderr(&o).contains("held in RAM"), "{}", stderr(&o));
    }
    let o = ask(&["--ram", "lots"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--ram") && stderr(&o).contains("auto, off"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn the_tier_counts_selections_into_the_expert_profile_and_starts_from_it() {
    let dir = fixture("tiny-vocab");
    let (layers, n) = config(&dir);
    let home = tempfile::tempdir().unwrap();
    let profile = home.path().join("profile.json");
    let ask = || {
        let o = one_shot(
            "6",
            &["--ram", "0", "--expert-profile", profile.to_str().unwrap()],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let p: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&profile).unwrap()).unwrap();
        assert_eq!(p["layers"].as_u64(), Some(layers));
        assert_eq!(p["experts"].as_u64(), Some(n));
        let total: u64 = p["counts"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|c| c.as_u64().unwrap()))
            .sum();
        (v["ram_tier"]["reads"].as_u64().unwrap(), total)
    };
    // Nothing held: every selection is read, and each is counted once.
    let (reads, total) = ask();
    assert!(reads > 0);
    assert_eq!(total, reads);
    // The next run starts from those counts and adds its own (the same selections again).
    let (reads2, total2) = ask();
    assert_eq!(reads2, reads);
    assert_eq!(total2, 2 * reads);
}

#[test]
fn the_plan_takes_expert_hits_from_a_usage_profile() {
    // The release config's 43 layers x 256 experts, without weights; 64 GB leaves room in
    // RAM for some experts per layer but not all.
    let home = tempfile::tempdir().unwrap();
    let plan = |counts: &dyn Fn(usize) -> u64| {
        let row: Vec<u64> = (0..256).map(counts).collect();
        let profile = home.path().join("p.json");
        let p = serde_json::json!({"layers": 43, "experts": 256, "counts": vec![row; 43]});
        std::fs::write(&profile, p.to_string()).unwrap();
        let o = run(&[
            "inspect",
            "--plan",
            "--json",
            "--gpu-mem",
            "0",
            "--ram",
            "64G",
            "--cpu-gbs",
            "100",
            "--disk-gbs",
            "3",
            "--expert-profile",
            profile.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        (
            v[0]["ram_experts_per_layer"].as_u64().unwrap() as f64,
            v[0]["ram_hit_rate"].as_f64().unwrap(),
            v[0]["disk_rate"].as_f64().unwrap(),
        )
    };
    // Even use: the experts in RAM serve their share of the selections, no more.
    let (held, hit, disk) = plan(&|_| 10);
    assert!(held > 0.0 && held < 256.0, "{held}");
    assert!((hit - held / 256.0).abs() < 1e-9, "{hit} vs {held}/256");
    assert!((disk - (1.0 - held / 256.0)).abs() < 1e-9, "{disk}");
    // Every selection on expert 7: RAM serves them all.
    let (_, hit, disk) = plan(&|e| if e == 7 { 100 } else { 0 });
    assert_eq!((hit, disk), (1.0, 0.0));
    // A profile for another shape is refused, naming the flag.
    let profile = home.path().join("p.json");
    std::fs::write(
        &profile,
        r#"{"layers":2,"experts":8,"counts":[[1,1,1,1,1,1,1,1],[1,1,1,1,1,1,1,1]]}"#,
    )
    .unwrap();
    let o = run(&[
        "inspect",
        "--plan",
        "--gpu-mem",
        "0",
        "--cpu-gbs",
        "100",
        "--expert-profile",
        profile.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--expert-profile"), "{}", stderr(&o));
}
