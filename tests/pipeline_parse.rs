//! The pipeline's readers of model output, on the shapes real Qwen-VL models emit.
//!
//! Each case states the exact expected values. The last tests throw random bytes and random
//! truncations of valid outputs at every reader and check they never panic and keep their
//! guarantees (step cap, boxes inside the image with positive area).

use qwen_vl::config::Family;
use qwen_vl::pipeline::parse::{
    clean_text, format_box, parse_boxes, parse_steps, strip_code_fences, strip_special_tokens,
    BBox, LabeledBox, ReasoningStep, MAX_STEP_CHARS,
};

// ------------------------------------------------------------------------------------------
// helpers
// ------------------------------------------------------------------------------------------

#[track_caller]
fn assert_steps(text: &str, max_steps: usize, want: &[(&str, bool)]) {
    let got = parse_steps(text, max_steps);
    let got_pairs: Vec<(&str, bool)> = got
        .iter()
        .map(|s| (s.text.as_str(), s.needs_vision))
        .collect();
    assert_eq!(
        got_pairs, want,
        "parse_steps(max {max_steps}) of:\n{text}\n-- got (left) vs expected (right)"
    );
}

type Want<'a> = (f32, f32, f32, f32, Option<&'a str>);

#[track_caller]
fn assert_boxes(
    family: Family,
    text: &str,
    original: (u32, u32),
    resized: (u32, u32),
    want: &[Want<'_>],
) {
    let got = parse_boxes(family, text, original, resized);
    assert_eq!(
        got.len(),
        want.len(),
        "{family:?} boxes of:\n{text}\n-- got {got:?}, expected {want:?}"
    );
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let gv = [g.bbox.x1, g.bbox.y1, g.bbox.x2, g.bbox.y2];
        let wv = [w.0, w.1, w.2, w.3];
        for (k, (a, b)) in gv.iter().zip(wv).enumerate() {
            assert!(
                (a - b).abs() <= 1e-3,
                "{family:?} box {i} coordinate {k}: got {a}, expected {b} (off by {}) in:\n{text}",
                (a - b).abs()
            );
        }
        assert_eq!(
            g.label.as_deref(),
            w.4,
            "{family:?} box {i} label, in:\n{text}"
        );
    }
}

fn lb(x1: f32, y1: f32, x2: f32, y2: f32, label: Option<&str>) -> LabeledBox {
    LabeledBox {
        bbox: BBox { x1, y1, x2, y2 },
        label: label.map(str::to_string),
    }
}

// ------------------------------------------------------------------------------------------
// phase 1: reasoning steps
// ------------------------------------------------------------------------------------------

#[test]
fn steps_from_a_plain_json_array() {
    assert_steps(
        r#"[{"text": "Find the red car.", "needs_vision": true}, {"text": "Compare its size with the bus.", "needs_vision": false}]"#,
        5,
        &[
            ("Find the red car.", true),
            ("Compare its size with the bus.", false),
        ],
    );
}

#[test]
fn steps_from_an_object_with_a_steps_key() {
    assert_steps(
        r#"{"steps": [{"text": "Read the street sign", "needs_vision": true}, {"text": "Recall which city uses that name", "needs_vision": false}], "answer": null}"#,
        5,
        &[
            ("Read the street sign", true),
            ("Recall which city uses that name", false),
        ],
    );
}

#[test]
fn steps_from_a_code_fence_with_prose_around_it() {
    let text = "Sure! Here are the steps:\n```json\n[\n  {\"text\": \"Locate the clock tower\", \"needs_vision\": true},\n  {\"text\": \"Read the time on its face\", \"needs_vision\": true},\n  {\"text\": \"Convert to 24-hour time\", \"needs_vision\": false}\n]\n```\nLet me know if you need more.";
    assert_steps(
        text,
        5,
        &[
            ("Locate the clock tower", true),
            ("Read the time on its face", true),
            ("Convert to 24-hour time", false),
        ],
    );
}

#[test]
fn steps_from_single_quoted_python_literals() {
    assert_steps(
        "[{'text': 'Count the apples in the bowl', 'needs_vision': True}, {'text': \"Subtract the dog's share\", 'needs_vision': False}, {'text': 'Add the two totals', 'needs_vision': None}]",
        5,
        &[
            ("Count the apples in the bowl", true),
            ("Subtract the dog's share", false),
            // None is no flag: the looking-words rule decides ("add", "totals": no).
            ("Add the two totals", false),
        ],
    );
}

#[test]
fn steps_with_apostrophes_inside_single_quotes() {
    assert_steps(
        "[{'text': 'Check the man's hat colour', 'needs_vision': True}, {'text': 'Decide if it's formal', 'needs_vision': False}]",
        5,
        &[
            ("Check the man's hat colour", true),
            ("Decide if it's formal", false),
        ],
    );
}

#[test]
fn steps_with_trailing_commas_and_comments() {
    assert_steps(
        "[\n  {\"text\": \"Find the cat\", \"needs_vision\": true,},\n  // second step\n  {\"text\": \"Name its breed\", \"needs_vision\": false,},\n]",
        5,
        &[("Find the cat", true), ("Name its breed", false)],
    );
}

#[test]
fn steps_with_missing_flags_use_the_looking_words_rule() {
    assert_steps(
        r#"[{"text": "Locate the dog"}, {"text": "Multiply the two numbers"}, {"text": "What color is the sky?"}, {"text": "Decide which is larger"}, {"text": "Where is the exit"}]"#,
        10,
        &[
            ("Locate the dog", true),
            ("Multiply the two numbers", false),
            ("What color is the sky?", true),
            ("Decide which is larger", false),
            ("Where is the exit", true),
        ],
    );
}

#[test]
fn steps_with_various_key_names() {
    assert_steps(
        r#"[
          {"step": "Find the price tag", "needs_visual_verification": true},
          {"description": "Convert euros to dollars", "visual": false},
          {"reasoning": "Check the tag is on the shirt", "verify": "yes"},
          {"Step": 4, "Description": "Round the result", "Needs-Vision": 0},
          {"thought": "Look at the receipt total", "requires_visual_check": "no"}
        ]"#,
        10,
        &[
            ("Find the price tag", true),
            ("Convert euros to dollars", false),
            ("Check the tag is on the shirt", true),
            ("Round the result", false),
            ("Look at the receipt total", false),
        ],
    );
}

#[test]
fn steps_from_reasoning_steps_key_with_numbered_objects() {
    assert_steps(
        r#"{"reasoning_steps": [{"step": 1, "description": "Identify the animal on the left", "needs_vision": true}, {"step": 2, "description": "Recall its typical diet", "needs_vision": false}]}"#,
        5,
        &[
            ("Identify the animal on the left", true),
            ("Recall its typical diet", false),
        ],
    );
}

#[test]
fn steps_under_another_key_or_nested() {
    assert_steps(
        r#"{"plan": ["Spot the traffic light", "Infer whether cars may go"]}"#,
        5,
        &[
            ("Spot the traffic light", true),
            ("Infer whether cars may go", false),
        ],
    );
    assert_steps(
        r#"{"analysis": {"steps": [{"text": "Read the label", "needs_vision": true}]}}"#,
        5,
        &[("Read the label", true)],
    );
}

#[test]
fn steps_from_an_array_of_strings_and_pairs() {
    assert_steps(
        r#"["Find the cat", "Count its legs", ["Sum them", false], ["Inspect the tail", "yes"]]"#,
        5,
        &[
            ("Find the cat", true),
            ("Count its legs", true),
            ("Sum them", false),
            ("Inspect the tail", true),
        ],
    );
}

#[test]
fn steps_from_json_lines() {
    assert_steps(
        "{\"text\": \"Find the bicycle\", \"needs_vision\": true}\n{\"text\": \"Estimate its age\", \"needs_vision\": false}\n",
        5,
        &[("Find the bicycle", true), ("Estimate its age", false)],
    );
}

#[test]
fn steps_from_unquoted_keys_and_bare_values() {
    assert_steps(
        "[{text: \"Find the boat\", needs_vision: true}, {text: Estimate the distance, needs_vision: no}]",
        5,
        &[("Find the boat", true), ("Estimate the distance", false)],
    );
}

#[test]
fn steps_with_unescaped_inner_quotes() {
    assert_steps(
        r#"[{"text": "Read the sign "STOP" near the car", "needs_vision": true}]"#,
        5,
        &[("Read the sign \"STOP\" near the car", true)],
    );
}

#[test]
fn steps_recovered_from_truncated_json() {
    assert_steps(
        r#"[{"text": "Find the bus", "needs_vision": true}, {"text": "Read its route number", "needs_vision": true}, {"text": "Look up where the rou"#,
        5,
        &[("Find the bus", true), ("Read its route number", true)],
    );
    assert_steps(
        "```json\n{\"steps\": [{\"text\": \"Find the bus\", \"needs_vision\": true}, {\"text\": \"Name the company\", \"needs_vision\": fa",
        5,
        &[("Find the bus", true)],
    );
    // A cut single object is not a complete step.
    assert_steps(r#"{"text": "Find the bus", "needs_vi"#, 5, &[]);
}

#[test]
fn steps_from_numbered_plain_text() {
    assert_steps(
        "To answer this:\n1. Locate the woman in the red coat.\n2. Check what she is holding.\n3) Decide whether it is an umbrella.\n\nThe answer follows from these.",
        5,
        &[
            ("Locate the woman in the red coat.", true),
            ("Check what she is holding.", true),
            ("Decide whether it is an umbrella.", false),
        ],
    );
    assert_steps(
        "**Step 1:** Find the scoreboard\n**Step 2:** Read the home score\nStep 3 - Compare with the away score",
        5,
        &[
            ("Find the scoreboard", true),
            ("Read the home score", true),
            ("Compare with the away score", false),
        ],
    );
}

#[test]
fn steps_from_plain_text_with_inline_flags_and_bullets() {
    assert_steps(
        "1. Look at the chart title - needs_vision: true\n2. Recall the unit (needs vision: no)\n3. Compute the growth, needs_vision=False",
        5,
        &[
            ("Look at the chart title", true),
            ("Recall the unit", false),
            ("Compute the growth", false),
        ],
    );
    assert_steps(
        "Steps:\n- Find the dog\n- Judge its mood\n* Read the tag",
        5,
        &[
            ("Find the dog", true),
            ("Judge its mood", false),
            ("Read the tag", true),
        ],
    );
}

#[test]
fn steps_after_thinking_and_with_special_tokens() {
    let text = "<think>The format is [{\"text\": \"example\", \"needs_vision\": false}]. Let me plan.</think>\n[{\"text\": \"Find the <|im_end|>kite\", \"needs_vision\": true}]<|im_end|>";
    assert_steps(text, 5, &[("Find the kite", true)]);
}

#[test]
fn steps_are_capped_and_zero_means_none() {
    let text = r#"[{"text": "a1", "needs_vision": true}, {"text": "a2", "needs_vision": false}, {"text": "a3", "needs_vision": true}, {"text": "a4", "needs_vision": true}]"#;
    assert_steps(text, 2, &[("a1", true), ("a2", false)]);
    assert_steps(text, 0, &[]);
    assert_steps("1. Find x\n2. Find y\n3. Find z", 1, &[("Find x", true)]);
}

#[test]
fn steps_skip_empty_items_and_collapse_whitespace() {
    assert_steps(
        "[{\"text\": \"\", \"needs_vision\": true}, {\"text\": \"  Find\\n the   cup \", \"needs_vision\": true}, {\"needs_vision\": true}, 42, null]",
        5,
        &[("Find the cup", true)],
    );
}

#[test]
fn steps_long_text_is_cut_at_a_word() {
    let long = "word ".repeat(200);
    let got = parse_steps(&format!("[{{\"text\": \"{long}\"}}]"), 3);
    assert_eq!(got.len(), 1);
    assert!(
        got[0].text.chars().count() <= MAX_STEP_CHARS && got[0].text.ends_with("word"),
        "{} chars, ends {:?}",
        got[0].text.chars().count(),
        &got[0].text[got[0].text.len() - 5..]
    );
}

#[test]
fn steps_from_empty_or_garbage_are_empty() {
    for text in [
        "",
        "   \n ",
        "I cannot determine that from the image.",
        "[]",
        "{}",
        "[1, 2, 3]",
        "{\"answer\": 42}",
        "[[[[[[[[",
        "}}}]]]",
        "\u{0}\u{1}\u{fffd}",
        "[see figure 3]",
    ] {
        assert_eq!(
            parse_steps(text, 5),
            Vec::<ReasoningStep>::new(),
            "{text:?}"
        );
    }
}

#[test]
fn steps_prefer_the_first_list_over_an_example_object() {
    // A lone example object in prose, then the real list.
    assert_steps(
        "Format: {\"text\": \"Find x\", \"needs_vision\": true}\n[{\"text\": \"Find the goal\", \"needs_vision\": true}, {\"text\": \"Sum the goals\", \"needs_vision\": false}]",
        5,
        &[("Find the goal", true), ("Sum the goals", false)],
    );
}

// ------------------------------------------------------------------------------------------
// phase 2: Qwen2-VL boxes (0-1000 grid, corner pairs)
// ------------------------------------------------------------------------------------------

const Q2_ORIG: (u32, u32) = (1000, 500);
const Q2_RESIZED: (u32, u32) = (1008, 504); // ignored by Qwen2-VL

#[track_caller]
fn q2(text: &str, want: &[Want<'_>]) {
    assert_boxes(Family::Qwen2Vl, text, Q2_ORIG, Q2_RESIZED, want);
}

#[test]
fn qwen2_native_box() {
    q2(
        "<|box_start|>(100,200),(300,400)<|box_end|>",
        &[(100.0, 100.0, 300.0, 200.0, None)],
    );
}

#[test]
fn qwen2_box_with_object_ref_label() {
    q2(
        "<|object_ref_start|>the red car<|object_ref_end|><|box_start|>(120,340),(560,980)<|box_end|><|im_end|>",
        &[(120.0, 170.0, 560.0, 490.0, Some("the red car"))],
    );
}

#[test]
fn qwen2_box_decoded_without_special_tokens() {
    q2(
        "the red car(120,340),(560,980)",
        &[(120.0, 170.0, 560.0, 490.0, None)],
    );
}

#[test]
fn qwen2_several_labeled_boxes() {
    q2(
        "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(10,20),(110,220)<|box_end|> and <|object_ref_start|>dog<|object_ref_end|><|box_start|>(500,500),(900,1000)<|box_end|>",
        &[
            (10.0, 10.0, 110.0, 110.0, Some("cat")),
            (500.0, 250.0, 900.0, 500.0, Some("dog")),
        ],
    );
}

#[test]
fn qwen2_several_pairs_in_one_box_share_the_label() {
    q2(
        "<|object_ref_start|>Apple<|object_ref_end|><|box_start|>(475,318),(492,337), (620,279),(631,301), (351,275),(367,292)<|box_end|>",
        &[
            (475.0, 159.0, 492.0, 168.5, Some("Apple")),
            (620.0, 139.5, 631.0, 150.5, Some("Apple")),
            (351.0, 137.5, 367.0, 146.0, Some("Apple")),
        ],
    );
}

#[test]
fn qwen2_spaces_and_decimals_inside_corners() {
    q2(
        "<|box_start|>( 100 , 200 ) , ( 300.5 , 400 )<|box_end|>",
        &[(100.0, 100.0, 300.5, 200.0, None)],
    );
}

#[test]
fn qwen2_swapped_corners_are_reordered() {
    q2(
        "<|box_start|>(300,400),(100,200)<|box_end|>",
        &[(100.0, 100.0, 300.0, 200.0, None)],
    );
    q2(
        "<|box_start|>(300,200),(100,400)<|box_end|>",
        &[(100.0, 100.0, 300.0, 200.0, None)],
    );
}

#[test]
fn qwen2_out_of_range_is_clamped() {
    q2(
        "<|box_start|>(-50,900),(1200,1100)<|box_end|>",
        &[(0.0, 450.0, 1000.0, 500.0, None)],
    );
}

#[test]
fn qwen2_degenerate_boxes_are_dropped() {
    q2("<|box_start|>(100,200),(100,400)<|box_end|>", &[]);
    q2("<|box_start|>(1100,200),(1300,400)<|box_end|>", &[]);
    q2(
        "<|box_start|>(10,10),(10,10)<|box_end|><|box_start|>(0,0),(1000,1000)<|box_end|>",
        &[(0.0, 0.0, 1000.0, 500.0, None)],
    );
}

#[test]
fn qwen2_truncated_box_gives_nothing() {
    q2(
        "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(100,200),(30",
        &[],
    );
    q2("<|object_ref_start|>the ca", &[]);
}

#[test]
fn qwen2_box_inside_prose() {
    q2(
        "The <|object_ref_start|>umbrella<|object_ref_end|> is at <|box_start|>(250,0),(750,500)<|box_end|>, held by a woman.<|im_end|>",
        &[(250.0, 0.0, 750.0, 250.0, Some("umbrella"))],
    );
}

#[test]
fn qwen2_stray_point_does_not_pair_across_text() {
    q2(
        "The point (5,5) is not a box. <|box_start|>(100,200),(300,400)<|box_end|>",
        &[(100.0, 100.0, 300.0, 200.0, None)],
    );
}

#[test]
fn qwen2_legacy_ref_box_tags() {
    q2(
        "<ref>the dog</ref><box>(10,20),(30,40)</box>",
        &[(10.0, 10.0, 30.0, 20.0, Some("the dog"))],
    );
}

#[test]
fn qwen2_json_fallback_uses_the_same_grid() {
    q2(
        "```json\n[{\"bbox_2d\": [100, 200, 300, 400], \"label\": \"sign\"}]\n```",
        &[(100.0, 100.0, 300.0, 200.0, Some("sign"))],
    );
    q2(
        "[100, 200, 300, 400]",
        &[(100.0, 100.0, 300.0, 200.0, None)],
    );
}

#[test]
fn qwen2_label_is_cleaned() {
    q2(
        "<|object_ref_start|>  a   big\n truck <|object_ref_end|><|box_start|>(0,0),(500,500)<|box_end|>",
        &[(0.0, 0.0, 500.0, 250.0, Some("a big truck"))],
    );
}

#[test]
fn qwen2_garbage_and_empty_give_nothing() {
    for text in [
        "",
        "I don't see a car.",
        "<|box_start|><|box_end|>",
        "(1,2)",
        "(a,b),(c,d)",
        "<|object_ref_start|><|object_ref_start|><|object_ref_start|>",
    ] {
        q2(text, &[]);
    }
}

#[test]
fn qwen2_zero_sized_image_gives_nothing() {
    assert_eq!(
        parse_boxes(
            Family::Qwen2Vl,
            "<|box_start|>(100,200),(300,400)<|box_end|>",
            (0, 0),
            (0, 0)
        ),
        vec![]
    );
}

// ------------------------------------------------------------------------------------------
// phase 2: Qwen2.5-VL boxes (absolute pixels of the resized input)
// ------------------------------------------------------------------------------------------

const Q25_ORIG: (u32, u32) = (1000, 800);
const Q25_RESIZED: (u32, u32) = (500, 400); // every resized pixel is 2 original pixels

#[track_caller]
fn q25(text: &str, want: &[Want<'_>]) {
    assert_boxes(Family::Qwen25Vl, text, Q25_ORIG, Q25_RESIZED, want);
}

#[test]
fn qwen25_native_fenced_array() {
    q25(
        "```json\n[\n\t{\"bbox_2d\": [135, 114, 316, 272], \"label\": \"a cat\"}\n]\n```",
        &[(270.0, 228.0, 632.0, 544.0, Some("a cat"))],
    );
}

#[test]
fn qwen25_single_object_without_array() {
    q25(
        "{\n\"bbox_2d\": [10, 20, 110, 220]\n}",
        &[(20.0, 40.0, 220.0, 440.0, None)],
    );
}

#[test]
fn qwen25_several_objects_and_several_fences() {
    q25(
        "Here you go:\n```json\n[{\"bbox_2d\": [0, 0, 50, 50], \"label\": \"cup\"}, {\"bbox_2d\": [100, 100, 200, 150], \"label\": \"plate\"}]\n```\nAnd also:\n```json\n{\"bbox_2d\": [300, 200, 400, 300], \"label\": \"fork\"}\n```",
        &[
            (0.0, 0.0, 100.0, 100.0, Some("cup")),
            (200.0, 200.0, 400.0, 300.0, Some("plate")),
            (600.0, 400.0, 800.0, 600.0, Some("fork")),
        ],
    );
}

#[test]
fn qwen25_points_are_not_boxes() {
    q25(
        "[{\"point_2d\": [120, 200], \"label\": \"person\"}, {\"point_2d\": [[1, 2], [3, 4]], \"label\": \"x\"}]",
        &[],
    );
    q25(
        "[{\"bbox_2d\": [10, 10, 20, 20], \"point_2d\": [15, 15], \"label\": \"button\"}]",
        &[(20.0, 20.0, 40.0, 40.0, Some("button"))],
    );
}

#[test]
fn qwen25_single_quotes_and_python_literals() {
    q25(
        "[{'bbox_2d': [10, 20, 30, 40], 'label': 'the dog\\'s ball', 'occluded': False, 'extra': None}]",
        &[(20.0, 40.0, 60.0, 80.0, Some("the dog's ball"))],
    );
}

#[test]
fn qwen25_truncated_output_keeps_complete_boxes() {
    q25(
        "```json\n[\n\t{\"bbox_2d\": [10, 20, 30, 40], \"label\": \"a\"},\n\t{\"bbox_2d\": [50, 60, 70, 80], \"label\": \"b\"},\n\t{\"bbox_2d\": [90, 100, 1",
        &[
            (20.0, 40.0, 60.0, 80.0, Some("a")),
            (100.0, 120.0, 140.0, 160.0, Some("b")),
        ],
    );
}

#[test]
fn qwen25_beyond_the_resized_input_is_clamped() {
    q25(
        "[{\"bbox_2d\": [-10, 350, 520, 430], \"label\": \"table\"}]",
        &[(0.0, 700.0, 1000.0, 800.0, Some("table"))],
    );
}

#[test]
fn qwen25_swapped_and_degenerate() {
    q25(
        "[{\"bbox_2d\": [200, 150, 100, 50]}, {\"bbox_2d\": [5, 5, 5, 50]}, {\"bbox_2d\": [600, 0, 700, 10]}]",
        &[(200.0, 100.0, 400.0, 300.0, None)],
    );
}

#[test]
fn qwen25_json_inside_prose_without_fence() {
    q25(
        "The mug is here: [{\"bbox_2d\": [250, 100, 300, 180], \"label\": \"mug\"}] as requested.<|im_end|>",
        &[(500.0, 200.0, 600.0, 360.0, Some("mug"))],
    );
}

#[test]
fn qwen25_bare_coordinate_arrays() {
    q25("[10, 20, 30, 40]", &[(20.0, 40.0, 60.0, 80.0, None)]);
    q25(
        "[[10, 20, 30, 40], [50, 60, 70, 80]]",
        &[
            (20.0, 40.0, 60.0, 80.0, None),
            (100.0, 120.0, 140.0, 160.0, None),
        ],
    );
}

#[test]
fn qwen25_nested_under_another_key() {
    q25(
        "{\"objects\": [{\"name\": \"kite\", \"bbox\": [\"100\", \"50\", \"150\", \"90\"]}]}",
        &[(200.0, 100.0, 300.0, 180.0, Some("kite"))],
    );
}

#[test]
fn qwen25_bbox_as_string_and_as_corner_pairs() {
    q25(
        "[{\"bbox_2d\": \"[10, 20, 30, 40]\", \"label\": \"a\"}, {\"bbox_2d\": [[50, 60], [70, 80]], \"label\": \"b\"}]",
        &[
            (20.0, 40.0, 60.0, 80.0, Some("a")),
            (100.0, 120.0, 140.0, 160.0, Some("b")),
        ],
    );
}

#[test]
fn qwen25_several_boxes_under_one_key() {
    q25(
        "{\"bbox_2d\": [[10, 20, 30, 40], [50, 60, 70, 80]], \"label\": \"tile\"}",
        &[
            (20.0, 40.0, 60.0, 80.0, Some("tile")),
            (100.0, 120.0, 140.0, 160.0, Some("tile")),
        ],
    );
}

#[test]
fn qwen25_json_lines_without_array() {
    q25(
        "{\"bbox_2d\": [10, 20, 30, 40], \"label\": \"a\"}\n{\"bbox_2d\": [50, 60, 70, 80], \"label\": \"b\"}",
        &[
            (20.0, 40.0, 60.0, 80.0, Some("a")),
            (100.0, 120.0, 140.0, 160.0, Some("b")),
        ],
    );
}

#[test]
fn qwen25_trailing_commas_and_object_corner_form() {
    q25(
        "[{\"bbox_2d\": [10, 20, 30, 40,], \"label\": \"a\",}, {\"x1\": 50, \"y1\": 60, \"x2\": 70, \"y2\": 80, \"label\": \"b\"},]",
        &[
            (20.0, 40.0, 60.0, 80.0, Some("a")),
            (100.0, 120.0, 140.0, 160.0, Some("b")),
        ],
    );
}

#[test]
fn qwen25_corner_pair_fallback_in_resized_pixels() {
    q25(
        "<|object_ref_start|>door<|object_ref_end|><|box_start|>(100,50),(200,350)<|box_end|>",
        &[(200.0, 100.0, 400.0, 700.0, Some("door"))],
    );
}

#[test]
fn qwen25_real_resize_ratio() {
    // smart_resize(1080, 1920) with factor 28 gives 1092 x 1932.
    assert_boxes(
        Family::Qwen25Vl,
        "```json\n[{\"bbox_2d\": [966, 546, 1932, 1092], \"label\": \"right half\"}]\n```",
        (1920, 1080),
        (1932, 1092),
        &[(960.0, 540.0, 1920.0, 1080.0, Some("right half"))],
    );
}

#[test]
fn qwen25_zero_resized_size_gives_nothing() {
    assert_eq!(
        parse_boxes(
            Family::Qwen25Vl,
            "[{\"bbox_2d\": [1, 2, 3, 4]}]",
            (100, 100),
            (0, 0)
        ),
        vec![]
    );
}

#[test]
fn qwen25_garbage_gives_nothing() {
    for text in [
        "",
        "There is no cat in the image.",
        "[1, 2, 3]",
        "{\"bbox_2d\": [1, 2, 3]}",
        "{\"bbox_2d\": [\"a\", \"b\", \"c\", \"d\"]}",
        "```json\n```",
        "[[[[[[[[[[[[",
    ] {
        q25(text, &[]);
    }
}

// ------------------------------------------------------------------------------------------
// phase 2: Qwen3-VL boxes (0-1000 grid, JSON)
// ------------------------------------------------------------------------------------------

const Q3_ORIG: (u32, u32) = (1000, 500);
const Q3_RESIZED: (u32, u32) = (1024, 512); // ignored by Qwen3-VL

#[track_caller]
fn q3(text: &str, want: &[Want<'_>]) {
    assert_boxes(Family::Qwen3Vl, text, Q3_ORIG, Q3_RESIZED, want);
}

#[test]
fn qwen3_native_fenced_array() {
    q3(
        "```json\n[\n\t{\"bbox_2d\": [731, 2, 1000, 273], \"label\": \"bird\"}\n]\n```",
        &[(731.0, 1.0, 1000.0, 136.5, Some("bird"))],
    );
}

#[test]
fn qwen3_several_objects() {
    q3(
        "```json\n[\n\t{\"bbox_2d\": [0, 0, 500, 1000], \"label\": \"left\"},\n\t{\"bbox_2d\": [500, 0, 1000, 1000], \"label\": \"right\"}\n]\n```",
        &[
            (0.0, 0.0, 500.0, 500.0, Some("left")),
            (500.0, 0.0, 1000.0, 500.0, Some("right")),
        ],
    );
}

#[test]
fn qwen3_after_thinking() {
    q3(
        "<think>\nThe bird is top right, maybe [0, 0, 10, 10]? No.\n</think>\n\n```json\n[{\"bbox_2d\": [600, 100, 900, 400], \"label\": \"bird\"}]\n```",
        &[(600.0, 50.0, 900.0, 200.0, Some("bird"))],
    );
}

#[test]
fn qwen3_single_object() {
    q3(
        "{\"bbox_2d\": [100, 100, 200, 300], \"label\": \"cup\"}",
        &[(100.0, 50.0, 200.0, 150.0, Some("cup"))],
    );
}

#[test]
fn qwen3_truncated() {
    q3(
        "```json\n[\n\t{\"bbox_2d\": [100, 100, 200, 300], \"label\": \"cup\"},\n\t{\"bbox_2d\": [300, 300, 4",
        &[(100.0, 50.0, 200.0, 150.0, Some("cup"))],
    );
}

#[test]
fn qwen3_clamped_and_swapped() {
    q3(
        "[{\"bbox_2d\": [1100, 1200, 900, -30], \"label\": \"edge\"}]",
        &[(900.0, 0.0, 1000.0, 500.0, Some("edge"))],
    );
}

#[test]
fn qwen3_non_square_image() {
    assert_boxes(
        Family::Qwen3Vl,
        "[{\"bbox_2d\": [500, 500, 1000, 1000], \"label\": \"corner\"}]",
        (640, 480),
        (640, 480),
        &[(320.0, 240.0, 640.0, 480.0, Some("corner"))],
    );
}

#[test]
fn qwen3_python_style_and_trailing_commas() {
    q3(
        "[{'bbox_2d': (10, 20, 30, 40), 'label': 'knob', 'visible': True,},]",
        &[(10.0, 10.0, 30.0, 20.0, Some("knob"))],
    );
}

#[test]
fn qwen3_xyxy_object_form() {
    q3(
        "{\"box\": {\"xmin\": 100, \"ymin\": 200, \"xmax\": 400, \"ymax\": 600}, \"category\": \"sofa\"}",
        &[(100.0, 100.0, 400.0, 300.0, Some("sofa"))],
    );
}

#[test]
fn qwen3_corner_pair_fallback_on_its_grid() {
    q3(
        "the lamp (100,200),(300,400)",
        &[(100.0, 100.0, 300.0, 200.0, None)],
    );
}

#[test]
fn qwen3_degenerate_and_nan_dropped() {
    q3(
        "[{\"bbox_2d\": [100, 100, 100, 200]}, {\"bbox_2d\": [\"nan\", 1, 2, 3]}, {\"bbox_2d\": [NaN, 1, 2, 3]}, {\"bbox_2d\": [10, 10, 20, 20]}]",
        &[(10.0, 5.0, 20.0, 10.0, None)],
    );
}

#[test]
fn qwen3_infinite_coordinates_clamp_to_the_edge() {
    q3("[{\"bbox_2d\": [\"-inf\", 0, \"inf\", 1e999]}]", &[]);
    q3(
        "[{\"bbox_2d\": [\"-inf\", 0, \"inf\", 1000]}]",
        &[(0.0, 0.0, 1000.0, 500.0, None)],
    );
}

#[test]
fn qwen3_fences_with_prose_between() {
    q3(
        "First object:\n```json\n{\"bbox_2d\": [0, 0, 100, 100], \"label\": \"a\"}\n```\nSecond object:\n```\n{\"bbox_2d\": [900, 900, 1000, 1000], \"label\": \"b\"}\n```\nDone.",
        &[
            (0.0, 0.0, 100.0, 50.0, Some("a")),
            (900.0, 450.0, 1000.0, 500.0, Some("b")),
        ],
    );
}

#[test]
fn qwen3_fence_not_closed_before_prose() {
    // The model forgot the closing bracket; the fence still ends the JSON.
    q3(
        "```json\n[{\"bbox_2d\": [0, 0, 100, 100], \"label\": \"a\"}\n```\nThat is the only one.",
        &[(0.0, 0.0, 100.0, 50.0, Some("a"))],
    );
}

#[test]
fn qwen3_label_key_variants() {
    q3(
        "[{\"bbox_2d\": [0, 0, 10, 10], \"name\": \"n\"}, {\"bbox_2d\": [0, 0, 10, 10], \"text_content\": \"STOP\"}, {\"bbox_2d\": [0, 0, 10, 10], \"label\": \"   \"}]",
        &[
            (0.0, 0.0, 10.0, 5.0, Some("n")),
            (0.0, 0.0, 10.0, 5.0, Some("STOP")),
            (0.0, 0.0, 10.0, 5.0, None),
        ],
    );
}

#[test]
fn qwen3_garbage_gives_nothing() {
    for text in [
        "",
        "No such object.",
        "```json\n[]\n```",
        "{\"label\": \"cat\"}",
        "{\"bbox_2d\": null}",
    ] {
        q3(text, &[]);
    }
}

// ------------------------------------------------------------------------------------------
// format_box and round trips
// ------------------------------------------------------------------------------------------

#[test]
fn format_box_writes_each_family_native_text() {
    let b = lb(100.0, 50.0, 300.0, 200.0, Some("red car"));
    assert_eq!(
        format_box(Family::Qwen2Vl, &b, (1000, 500), (1008, 504)),
        "<|object_ref_start|>red car<|object_ref_end|><|box_start|>(100,100),(300,400)<|box_end|>"
    );
    assert_eq!(
        format_box(Family::Qwen25Vl, &b, (1000, 500), (500, 250)),
        "```json\n[\n\t{\"bbox_2d\": [50, 25, 150, 100], \"label\": \"red car\"}\n]\n```"
    );
    assert_eq!(
        format_box(Family::Qwen3Vl, &b, (1000, 500), (1024, 512)),
        "```json\n[\n\t{\"bbox_2d\": [100, 100, 300, 400], \"label\": \"red car\"}\n]\n```"
    );
    let unlabeled = lb(300.0, 200.0, 100.0, 50.0, None); // swapped corners
    assert_eq!(
        format_box(Family::Qwen2Vl, &unlabeled, (1000, 500), (0, 0)),
        "<|box_start|>(100,100),(300,400)<|box_end|>"
    );
    assert_eq!(
        format_box(Family::Qwen3Vl, &unlabeled, (1000, 500), (0, 0)),
        "```json\n[\n\t{\"bbox_2d\": [100, 100, 300, 400]}\n]\n```"
    );
}

#[test]
fn format_box_escapes_and_sanitizes_labels() {
    let b = lb(0.0, 0.0, 10.0, 10.0, Some("a \"quoted\"<|im_end|> sign"));
    assert_eq!(
        format_box(Family::Qwen25Vl, &b, (10, 10), (10, 10)),
        "```json\n[\n\t{\"bbox_2d\": [0, 0, 10, 10], \"label\": \"a \\\"quoted\\\" sign\"}\n]\n```"
    );
    assert_eq!(
        format_box(Family::Qwen2Vl, &b, (10, 10), (10, 10)),
        "<|object_ref_start|>a \"quoted\" sign<|object_ref_end|><|box_start|>(0,0),(1000,1000)<|box_end|>"
    );
}

#[test]
fn format_then_parse_round_trips_within_one_grid_step() {
    let boxes = [
        lb(12.3, 45.6, 789.0, 456.0, Some("thing one")),
        lb(0.0, 0.0, 1919.0, 1079.0, None),
        lb(1000.5, 20.25, 1500.75, 900.0, Some("it's \"x\"")),
        lb(5.0, 5.0, 9.0, 9.0, Some("tiny")),
    ];
    let original = (1920, 1080);
    for family in [Family::Qwen2Vl, Family::Qwen25Vl, Family::Qwen3Vl] {
        let resized = if family == Family::Qwen25Vl {
            (1932, 1092)
        } else {
            (0, 0)
        };
        // Half a grid step in original pixels, per axis.
        let (gx, gy) = match family {
            Family::Qwen25Vl => (1920.0 / 1932.0 / 2.0, 1080.0 / 1092.0 / 2.0),
            _ => (1920.0 / 1000.0 / 2.0, 1080.0 / 1000.0 / 2.0),
        };
        for b in &boxes {
            let text = format_box(family, b, original, resized);
            let back = parse_boxes(family, &text, original, resized);
            assert_eq!(back.len(), 1, "{family:?}: {text} parsed to {back:?}");
            let (w, g) = (b.bbox, back[0].bbox);
            for (name, a, e, tol) in [
                ("x1", g.x1, w.x1, gx),
                ("y1", g.y1, w.y1, gy),
                ("x2", g.x2, w.x2, gx),
                ("y2", g.y2, w.y2, gy),
            ] {
                assert!(
                    (a - e).abs() <= tol + 1e-3,
                    "{family:?} {name}: {a} back from {e} (off by {}, allowed {tol}) via {text}",
                    (a - e).abs()
                );
            }
            assert_eq!(back[0].label, b.label, "{family:?} label via {text}");
        }
    }
}

#[test]
fn grid_aligned_boxes_round_trip_exactly() {
    let original = (1000, 500);
    let b = lb(100.0, 50.0, 300.0, 200.0, Some("exact"));
    for (family, resized) in [
        (Family::Qwen2Vl, (0, 0)),
        (Family::Qwen25Vl, (500, 250)),
        (Family::Qwen3Vl, (0, 0)),
    ] {
        let text = format_box(family, &b, original, resized);
        assert_eq!(
            parse_boxes(family, &text, original, resized),
            vec![b.clone()],
            "{family:?} via {text}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// phase 3/4: captions and answers
// ------------------------------------------------------------------------------------------

#[track_caller]
fn clean(text: &str, max: usize, want: &str) {
    assert_eq!(clean_text(text, max), want, "clean_text({text:?}, {max})");
}

#[test]
fn clean_text_cases() {
    clean("A red car.<|im_end|>", 100, "A red car.");
    clean(
        "A red car.<|im_end|>\n<|im_start|>user\nmore",
        100,
        "A red car.",
    );
    clean("<|im_start|>assistant\nA red car.", 100, "A red car.");
    clean("A red car.<|endoftext|><|endoftext|>", 100, "A red car.");
    clean(
        "  Answer:   Yes, it is raining.  ",
        100,
        "Yes, it is raining.",
    );
    clean("**Final Answer:** 42", 100, "42");
    clean("Answer: Answer: blue", 100, "blue");
    clean("A: two dogs", 100, "two dogs");
    clean("Caption: A cat on a mat.", 100, "A cat on a mat.");
    clean("```\nA cat on a mat.\n```", 100, "A cat on a mat.");
    clean("```text\nA cat on a mat.\n```", 100, "A cat on a mat.");
    clean("\"A cat on a mat.\"", 100, "A cat on a mat.");
    clean("'It's a cat.'", 100, "'It's a cat.'");
    clean("{\"answer\": \"three\"}", 100, "three");
    clean(
        "```json\n{\"caption\": \"a blue door\"}\n```",
        100,
        "a blue door",
    );
    clean(
        "<think>Let me look closely.</think>\n\nThe sign says STOP.",
        100,
        "The sign says STOP.",
    );
    clean(
        "The car\t is   red.\n\n\n\nIt is parked.  ",
        100,
        "The car is red.\n\nIt is parked.",
    );
    clean(
        "Sure<|vision_start|><|image_pad|><|vision_end|> thing",
        100,
        "Sure thing",
    );
    clean("one two three four five", 13, "one two three");
    clean("abcdefghijklmnop", 5, "abcde");
    clean("", 10, "");
    clean("<|im_end|>", 10, "");
    clean("Answer is obvious", 100, "Answer is obvious");
    clean("**Bold** statement", 100, "**Bold** statement");
    clean("anything", 0, "");
}

#[test]
fn special_tokens_and_fences_are_stripped_precisely() {
    assert_eq!(
        strip_special_tokens("a<|im_end|>b<|not a token|>c<|x|>d<||>e"),
        "ab<|not a token|>cd<||>e"
    );
    assert_eq!(
        strip_code_fences("```json\n[1]\n```\nok ```yes```"),
        "\n[1]\n\nok yes"
    );
}

// ------------------------------------------------------------------------------------------
// never panic: random bytes and random truncations
// ------------------------------------------------------------------------------------------

/// xorshift64*: small, deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const VALID_OUTPUTS: &[&str] = &[
    "```json\n[\n  {\"text\": \"Locate the clock tower\", \"needs_vision\": true},\n  {\"text\": \"Read the time\", \"needs_vision\": true}\n]\n```",
    "{'steps': [{'step': 'Count the cars', 'visual': True}, {'step': 'Add them', 'visual': False},]}",
    "1. Find the dog\n2. Check its collar\nStep 3: Decide",
    "<|object_ref_start|>the red car<|object_ref_end|><|box_start|>(120,340),(560,980)<|box_end|><|im_end|>",
    "```json\n[\n\t{\"bbox_2d\": [135, 114, 1016, 672], \"label\": \"a cat\"},\n\t{\"point_2d\": [1, 2]}\n]\n```",
    "<think>hmm [1,2,3,4]</think>{\"bbox_2d\": \"[1, 2, 3, 4]\", \"label\": \"x\\u00e9\\ud83d\\ude00\"}",
    "{\"objects\": [{\"box\": {\"xmin\": 1, \"ymin\": 2, \"xmax\": 3, \"ymax\": 4}}], \"answer\": \"ok\"}",
    "Answer: **yes** — the sign reads \"STOP\" ✋<|endoftext|>",
];

fn check_all_readers(text: &str, rng: &mut Rng) {
    let max_steps = rng.below(6);
    let steps = parse_steps(text, max_steps);
    assert!(
        steps.len() <= max_steps,
        "{} steps > max {max_steps} for {text:?}",
        steps.len()
    );
    for s in &steps {
        assert!(
            !s.text.is_empty() && s.text.chars().count() <= MAX_STEP_CHARS,
            "bad step {s:?} from {text:?}"
        );
    }
    let sizes = [0u32, 1, 7, 640, 1920, u32::MAX];
    let original = (sizes[rng.below(sizes.len())], sizes[rng.below(sizes.len())]);
    let resized = (sizes[rng.below(sizes.len())], sizes[rng.below(sizes.len())]);
    for family in [Family::Qwen2Vl, Family::Qwen25Vl, Family::Qwen3Vl] {
        for b in parse_boxes(family, text, original, resized) {
            let bb = b.bbox;
            let inside = bb.x1 >= 0.0
                && bb.y1 >= 0.0
                && bb.x2 <= original.0 as f32
                && bb.y2 <= original.1 as f32
                && bb.x2 > bb.x1
                && bb.y2 > bb.y1;
            assert!(
                inside,
                "{family:?} box {bb:?} not inside {original:?} with area, from {text:?}"
            );
            // Formatting what was parsed must not panic either.
            let _ = format_box(family, &b, original, resized);
        }
    }
    let max = rng.below(300);
    let cleaned = clean_text(text, max);
    assert!(
        cleaned.chars().count() <= max,
        "clean_text gave {} chars > {max}",
        cleaned.chars().count()
    );
}

#[test]
fn readers_never_panic_on_random_bytes() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // Bytes biased toward the characters the readers care about.
    const ALPHABET: &[u8] = b"{}[]()<>|\"',:.-+0123456789 \n\t\\`eEnNtTfFaslru_xybox";
    for _ in 0..3000 {
        let len = rng.below(200);
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                if rng.below(4) == 0 {
                    rng.next() as u8
                } else {
                    ALPHABET[rng.below(ALPHABET.len())]
                }
            })
            .collect();
        let text = String::from_utf8_lossy(&bytes);
        check_all_readers(&text, &mut rng);
    }
}

#[test]
fn readers_never_panic_on_truncated_or_mutated_outputs() {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    for valid in VALID_OUTPUTS {
        let cuts: Vec<usize> = (0..=valid.len())
            .filter(|&i| valid.is_char_boundary(i))
            .collect();
        for &cut in &cuts {
            check_all_readers(&valid[..cut], &mut rng);
        }
        for _ in 0..300 {
            let mut bytes = valid.as_bytes().to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(bytes.len());
                match rng.below(3) {
                    0 => bytes[at] = rng.next() as u8,
                    1 => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, b"{[\"',:]}"[rng.below(8)]),
                }
            }
            check_all_readers(&String::from_utf8_lossy(&bytes), &mut rng);
        }
    }
}

#[test]
fn pathological_inputs_finish_quickly() {
    let inputs = [
        "[".repeat(200_000),
        "{".repeat(200_000),
        "[\" ".repeat(50_000),
        "<|object_ref_start|>".repeat(20_000),
        "(1,".repeat(50_000),
        format!("[{}", "1, ".repeat(100_000)),
        "```".repeat(50_000),
        "<|".repeat(100_000),
    ];
    let start = std::time::Instant::now();
    let mut rng = Rng(7);
    for text in &inputs {
        check_all_readers(text, &mut rng);
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed.as_secs_f64() < 20.0,
        "pathological inputs took {elapsed:?} (unoptimised build)"
    );
}

#[test]
fn steps_from_numbered_members() {
    assert_steps(
        r#"{"step1": "Find the dog", "step2": "Guess its age", "step10": "Read the tag", "answer": "?"}"#,
        5,
        &[
            ("Find the dog", true),
            ("Guess its age", false),
            ("Read the tag", true),
        ],
    );
    assert_steps(
        r#"{"2": {"text": "Count them", "needs_vision": true}, "1": {"text": "Recall the rule", "needs_vision": false}}"#,
        5,
        &[("Recall the rule", false), ("Count them", true)],
    );
    assert_steps(
        r#"[{"Step 1": "Find the dog", "needs_vision": true}, {"Step 2": "Name it", "needs_vision": false}]"#,
        5,
        &[("Find the dog", true), ("Name it", false)],
    );
}

#[test]
fn non_ascii_text_survives() {
    assert_steps(
        "[{\"text\": \"找到红色的车\", \"needs_vision\": true}, {\"text\": \"Écrire la réponse\", \"needs_vision\": false}]",
        5,
        &[("找到红色的车", true), ("Écrire la réponse", false)],
    );
    q25(
        "```json\n[{\"bbox_2d\": [10, 20, 30, 40], \"label\": \"红色的车 🚗\"}]\n```",
        &[(20.0, 40.0, 60.0, 80.0, Some("红色的车 🚗"))],
    );
    q2(
        "<|object_ref_start|>狗<|object_ref_end|>在<|box_start|>(100,200),(300,400)<|box_end|>。",
        &[(100.0, 100.0, 300.0, 200.0, Some("狗"))],
    );
}

#[test]
fn steps_skip_an_echoed_placeholder() {
    assert_steps(
        "The format is [{\"text\": \"...\", \"needs_vision\": true}].\n[{\"text\": \"Find the goal\", \"needs_vision\": true}]",
        5,
        &[("Find the goal", true)],
    );
}

#[test]
fn qwen2_four_number_tuple_and_to_phrasing() {
    q2(
        "<|box_start|>(100,200,300,400)<|box_end|>",
        &[(100.0, 100.0, 300.0, 200.0, None)],
    );
    q2(
        "The sign spans from (100, 200) to (300, 400).",
        &[(100.0, 100.0, 300.0, 200.0, None)],
    );
    q2("(1,2,3)", &[]);
}
