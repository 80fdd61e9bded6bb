"""sdjax.tokenizer.CLIPTokenizer gives transformers' CLIPTokenizer ids exactly (SD 1.5 and SD 2.1 folders)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import transformers  # noqa: E402

from sdjax.tokenizer import CLIPTokenizer  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "sdjax" / "data" / "models"
FOLDERS = {
    "sd15": MODELS / "stable-diffusion-v1-5" / "tokenizer",
    "sd21": MODELS / "stable-diffusion-2-1" / "tokenizer",
}
PAD_IDS = {"sd15": 49407, "sd21": 0}

LONG = (
    "a highly detailed matte painting of a gigantic ancient castle on a cliff above a stormy sea, "
    "dramatic lighting, volumetric fog, crows circling the towers, by greg rutkowski and alphonse mucha, "
    "trending on artstation, 8k resolution, octane render, unreal engine 5, cinematic composition, "
    "golden hour, intricate stonework, moss, ivy, waterfalls, tiny figures on the bridge for scale"
)
PROMPTS = [
    "",
    " ",
    "a photo of an astronaut riding a horse on mars",
    "A PHOTO OF A CAT, Studio Lighting",
    "hello!!! what?! ... --- ;;; ,,, ???",
    "wow! great!",
    "it's a dog's life, they're here, we'll see, I'd go, you've been, I'm ok",
    "multiple   spaces\tand\ttabs\nand\n\nnewlines  ",
    "numbers 1234567890 3.14159 1,000,000 2nd 1080p",
    "café naïve résumé Ångström façade",
    "cafe\u0301 (combining accent, NFD) and non\u00a0breaking\u2003space",
    "emoji 🙂🚀🔥 👩‍👩‍👧 🇫🇷 and symbols ™ © ° ±",
    "日本語のテキスト 中文 한국어 русский العربية",
    "(masterpiece:1.3), ((best quality)), [worst quality:0.5], (blue eyes:1.2) <lora:style:0.8>",
    "[cat|dog] AND [red:green:0.4] BREAK sunset",
    "a <|endoftext|> in the middle <|startoftext|> and <|ENDOFTEXT|> upper case",
    "zero\u200bwidth and control\x07char",
    LONG,
    LONG + " " + LONG,
]


@pytest.fixture(scope="module", params=sorted(FOLDERS))
def pair(request):
    """(name, ours, transformers') for one tokenizer folder."""
    folder = FOLDERS[request.param]
    return (
        request.param,
        CLIPTokenizer.from_folder(folder),
        transformers.CLIPTokenizer.from_pretrained(folder),
    )


def test_special_tokens_and_sizes(pair):
    name, ours, ref = pair
    assert ours.model_max_length == ref.model_max_length == 77
    assert ours.bos_token_id == ref.bos_token_id == 49406
    assert ours.eos_token_id == ref.eos_token_id == 49407
    assert ours.pad_token_id == ref.pad_token_id == PAD_IDS[name]
    assert ours.pad_token == str(ref.pad_token)
    assert ours.vocab_size == ref.vocab_size == 49408
    assert len(ours) == len(ref)
    # The added-token table (ids and matching flags) is what makes literal special text match alike.
    assert (
        json.loads(ours.backend.to_str())["added_tokens"] == json.loads(ref.backend_tokenizer.to_str())["added_tokens"]
    )


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_single_prompt_matches(pair, prompt):
    _, ours, ref = pair
    want = ref(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    got = ours(prompt)
    assert got.dtype == np.int32 and got.shape == (1, 77)
    assert got[0].tolist() == want
    assert ours.encode_plain(prompt) == ref(prompt, add_special_tokens=False).input_ids


def test_batch_padding_matches(pair):
    name, ours, ref = pair
    got = ours(PROMPTS, padding="max_length", max_length=None, truncation=True)
    want = np.array(ref(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids)
    assert got.shape == (len(PROMPTS), 77) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)

    short = ["a cat", "a photo of a dog on a skateboard", ""]
    for kwargs in (dict(padding="longest"), dict(padding="max_length", max_length=12)):
        got = ours(short, **kwargs)
        want = np.array(ref(short, truncation=True, **{"max_length": 77, **kwargs}).input_ids)
        np.testing.assert_array_equal(got, want)

    # Rows: bos, words, eos, then padding with the folder's pad id; truncated rows still end with eos.
    batch = ours(["a cat", LONG])
    assert batch[0, :4].tolist() == [49406, 320, 2368, 49407]
    assert (batch[0, 4:] == PAD_IDS[name]).all()
    assert batch[1, 0] == 49406 and batch[1, -1] == 49407
    assert len(ours.encode_plain(LONG)) > 75


def test_truncation_off(pair):
    _, ours, ref = pair
    got = ours([LONG, "a cat"], padding="longest", truncation=False)
    want = ref([LONG, "a cat"], padding="longest", truncation=False).input_ids
    assert got.shape[1] > 77
    assert got.tolist() == want
    with pytest.raises(ValueError, match="max_length"):
        ours(LONG, padding="max_length", truncation=False)


def test_decode_matches(pair):
    _, ours, ref = pair
    for prompt in PROMPTS:
        ids = ours(prompt)[0]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids.tolist(), skip_special_tokens=skip)
    assert ours.decode(ours.encode_plain("A Photo of a CAT!")) == "a photo of a cat !"


def test_add_tokens_matches(pair):
    _, ours, ref_loaded = pair
    ref = transformers.CLIPTokenizer.from_pretrained(FOLDERS[pair[0]])  # fresh: add_tokens mutates
    new = ["<cat-toy>", "Sks"]
    extended = ours.add_tokens(new)
    assert ref.add_tokens(new) == 2
    assert [extended.token_to_id(t) for t in new] == [49408, 49409]
    assert [extended.token_to_id(t) for t in new] == ref.convert_tokens_to_ids(new)
    assert len(extended) == len(ref) == 49410
    assert extended.vocab_size == 49408
    assert len(ours) == 49408 and ours.token_to_id("<cat-toy>") is None  # the original is unchanged

    prompts = [
        "a photo of <cat-toy> on a beach",
        "<CAT-TOY> and sks and Sks dog",
        "two<cat-toy><cat-toy>,sks!",
        "no added tokens here (cat toy:1.2)",
    ]
    want = np.array(ref(prompts, padding="max_length", max_length=77, truncation=True).input_ids)
    np.testing.assert_array_equal(extended(prompts), want)
    np.testing.assert_array_equal(ours(prompts), ref_loaded(prompts, padding="max_length", max_length=77).input_ids)
    assert extended.decode(extended.encode_plain(prompts[0])) == ref.decode(ref(prompts[0]).input_ids[1:-1])


def _copy_folder(tmp_path: Path, skip: str | None = None) -> Path:
    dst = tmp_path / "tokenizer"
    dst.mkdir()
    for f in FOLDERS["sd21"].iterdir():
        if f.name != skip:
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt", "tokenizer_config.json"])
def test_missing_file_error(tmp_path, missing):
    folder = _copy_folder(tmp_path, skip=missing)
    with pytest.raises(FileNotFoundError, match=missing):
        CLIPTokenizer.from_folder(folder)


def test_bad_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        CLIPTokenizer.from_folder(tmp_path / "nope")
    folder = _copy_folder(tmp_path)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        CLIPTokenizer.from_folder(folder)


def test_special_tokens_map_is_optional(tmp_path):
    # Without the map file, SD 2.1's config pad "<|endoftext|>" applies, in transformers too.
    folder = _copy_folder(tmp_path, skip="special_tokens_map.json")
    ours = CLIPTokenizer.from_folder(folder)
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    assert ours.pad_token_id == ref.pad_token_id == 49407
    np.testing.assert_array_equal(
        ours(PROMPTS), ref(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    )


def test_added_tokens_decoder_config(tmp_path):
    """Newer configs list added tokens with ids; the map file is then ignored and saved ids are kept."""
    folder = _copy_folder(tmp_path)  # keeps SD 2.1's special_tokens_map.json (pad "!"), which must lose
    token = dict(lstrip=False, rstrip=False, single_word=False)
    config = {
        "added_tokens_decoder": {
            "49406": dict(content="<|startoftext|>", normalized=True, special=True, **token),
            "49407": dict(content="<|endoftext|>", normalized=False, special=True, **token),
            "49408": dict(content="<cat-toy>", normalized=True, special=False, **token),
        },
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours = CLIPTokenizer.from_folder(folder)
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    assert ours.pad_token_id == ref.pad_token_id == 49407
    assert ours.token_to_id("<cat-toy>") == 49408 and len(ours) == len(ref) == 49409
    prompts = PROMPTS + ["a <cat-toy> wow!! <|ENDOFTEXT|>"]
    np.testing.assert_array_equal(
        ours(prompts), ref(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    )


def test_runtime_needs_no_transformers_or_torch():
    module = Path(__file__).resolve().parents[1] / "sdjax" / "tokenizer.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('tok', {str(module)!r})\n"
        "mod = sys.modules['tok'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        f"tok = mod.CLIPTokenizer.from_folder({str(FOLDERS['sd15'])!r})\n"
        "assert tok('a cat').shape == (1, 77)\n"
        "bad = {'transformers', 'torch'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("name", ["stable-diffusion-v1-5", "stable-diffusion-2-1"])
def test_save_round_trip(name, tmp_path):
    """save() -> from_folder and transformers give the ids of the original, added tokens included."""
    from transformers import CLIPTokenizer as HFTokenizer

    original = CLIPTokenizer.from_folder(MODELS / name / "tokenizer").add_tokens(["<cat-toy>", "sks"])
    out = original.save(tmp_path / "tok")
    ours = CLIPTokenizer.from_folder(out)
    theirs = HFTokenizer.from_pretrained(out)
    prompts = ["a photo of <cat-toy> on sks beach!", "", "wow!!! (red:1.3) " * 20]
    expected = original(prompts)
    np.testing.assert_array_equal(ours(prompts), expected)
    np.testing.assert_array_equal(
        np.array(theirs(prompts, padding="max_length", max_length=77, truncation=True).input_ids), expected
    )
    assert (ours.pad_token_id, len(ours)) == (original.pad_token_id, len(original))
