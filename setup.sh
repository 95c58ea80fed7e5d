#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with pinned packages, and the
# course data in data/. Safe to run twice (skips what is already there).
# Offline, the data comes from ../shared/data beside the project instead.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
DATA_URL=${DATA_URL:-https://raw.githubusercontent.com/cfifty/public_cs224n_gpt/main/data}
# CoLA (GLUE acceptability), tokenized and lower-cased, "sentence<TAB>label" without a header.
COLA_URL=${COLA_URL:-https://raw.githubusercontent.com/felipefreitas93/NLPdatasets/HEAD/CoLA}
# Tiny Shakespeare (1.1 MB of the plays, public domain), a corpus to pretrain a small GPT-2 on.
SHAKESPEARE_URL=${SHAKESPEARE_URL:-https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt}
SHARED=../shared/data
# Poetry Foundation poems (Kaggle "tgdivy/poetry-foundation-poems", PoetryFoundationData.csv; tasks/poetry_corpus.py),
# fetched only by `setup.sh --poetry`, which does nothing else: exit status 0 when the CSV is there
# (downloaded now or before), 1 when it cannot be downloaded (one line says what to do).
POETRY_URL=${POETRY_URL:-https://www.kaggle.com/api/v1/datasets/download/tgdivy/poetry-foundation-poems}
POETRY_PAGE=https://www.kaggle.com/datasets/tgdivy/poetry-foundation-poems
POETRY_CSV=${POETRY_CSV:-data/PoetryFoundationData.csv}

fetch_poetry() {
  if [ -s "$POETRY_CSV" ]; then
    echo "    $POETRY_CSV is already there"
    return 0
  fi
  mkdir -p "$(dirname "$POETRY_CSV")"
  local part="$POETRY_CSV.part"
  # Kaggle serves the dataset as a zip holding the CSV; a plain CSV at POETRY_URL is taken as it is.
  if curl -sfL --connect-timeout 5 --max-time 600 "$POETRY_URL" -o "$part" && "$PYTHON" - "$part" "$POETRY_CSV" <<'EOF'
import shutil, sys, zipfile
src, dst = sys.argv[1:]
if zipfile.is_zipfile(src):
    with zipfile.ZipFile(src) as z:
        names = [n for n in z.namelist() if n.lower().endswith(".csv")]
        if not names:
            sys.exit(1)
        with z.open(names[0]) as f, open(src + ".csv", "wb") as out:
            shutil.copyfileobj(f, out)
    shutil.move(src + ".csv", src)
with open(src, encoding="utf-8", errors="replace") as f:
    if "poem" not in f.readline().lower():  # not the Poetry Foundation layout (an error page, another file)
        sys.exit(1)
shutil.move(src, dst)
EOF
  then
    echo "    downloaded $POETRY_CSV"
    return 0
  fi
  rm -f "$part" "$part.csv"
  echo "error: could not download the Poetry Foundation CSV from $POETRY_URL (offline, or Kaggle asks to log in):" \
       "download PoetryFoundationData.csv from $POETRY_PAGE and put it at $POETRY_CSV" >&2
  return 1
}
# `setup.sh --demo` (or SETUP_DEMO=1) also installs the sonnet demo's extras, requirements-demo.txt (gradio, and
# playwright for its browser test); a plain run does not need them. CI's .ci/run passes --demo.
SETUP_DEMO=${SETUP_DEMO:-0}
if [ "${1:-}" = "--demo" ]; then
  SETUP_DEMO=1
fi
if [ "${1:-}" = "--poetry" ]; then
  echo "==> the Poetry Foundation poems"
  fetch_poetry && exit 0 || exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=(pip_quiet "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# pip's notes about unusable local index folders are noise; real errors still show.
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

torch_version=$(grep -E '^torch==' requirements.txt | cut -d= -f3)
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "==> installing torch $torch_version (CUDA build: a GPU is present)"
    "${PIP[@]}" "torch==$torch_version"
  else
    echo "==> installing torch $torch_version (CPU build)"
    # The CPU index saves gigabytes; fall back to the default index if it is unreachable.
    "${PIP[@]}" --retries 0 --timeout 10 --index-url https://download.pytorch.org/whl/cpu "torch==$torch_version" 2>/dev/null \
      || "${PIP[@]}" "torch==$torch_version"
  fi
fi
echo "==> installing requirements.txt"
"${PIP[@]}" -r requirements.txt
if [ "$SETUP_DEMO" = 1 ]; then
  echo "==> installing requirements-demo.txt (the sonnet demo and its browser test)"
  "${PIP[@]}" -r requirements-demo.txt
fi

mkdir -p data predictions
FILES=(ids-sst-train.csv ids-sst-dev.csv ids-sst-test-student.csv
       ids-cfimdb-train.csv ids-cfimdb-dev.csv ids-cfimdb-test-student.csv
       sonnets.txt sonnets_held_out.txt sonnets_held_out_dev.txt TRUE_sonnets_held_out_dev.txt
       quora-train.csv quora-dev.csv quora-test-student.csv)
online=0
if curl -sfI --connect-timeout 5 --max-time 10 "$DATA_URL/sonnets.txt" >/dev/null 2>&1; then
  online=1
else
  echo "==> course data server unreachable; using $SHARED where it has the files"
fi
# fetch NAME URL: data/NAME from URL when online, else from $SHARED/NAME; skipped if present.
fetch() {
  local f=$1 url=$2
  [ -s "data/$f" ] && return 0
  if [ "$online" = 1 ] && curl -sfL --connect-timeout 5 --max-time 600 "$url" -o "data/$f.part"; then
    mv "data/$f.part" "data/$f"
    echo "    downloaded data/$f"
  else
    rm -f "data/$f.part"
    if [ -f "$SHARED/$f" ]; then
      cp "$SHARED/$f" "data/$f" && echo "    copied data/$f from $SHARED"
    else
      echo "    missing data/$f (not downloadable now, not in $SHARED)"
    fi
  fi
}
for f in "${FILES[@]}"; do
  fetch "$f" "$DATA_URL/$f"
done
fetch cola-train.tsv "$COLA_URL/train.tsv"
fetch cola-dev.tsv "$COLA_URL/dev.tsv"
fetch tinyshakespeare.txt "$SHAKESPEARE_URL"
# Offline stand-in for the Quora splits (paraphrase_detection.py carves train/dev/test from it).
if [ ! -s data/quora-train.csv ] && [ -f "$SHARED/quora-minbert-dev.csv" ] && [ ! -s data/quora-minbert-dev.csv ]; then
  cp "$SHARED/quora-minbert-dev.csv" data/ && echo "    copied data/quora-minbert-dev.csv (offline Quora stand-in)"
fi
[ -f optimizer_test.npy ] || { [ -f "$SHARED/optimizer_test.npy" ] && cp "$SHARED/optimizer_test.npy" .; }
echo "==> the CPU decoding kernel (decoding/csrc, compiled once per machine)"
"$VENV/bin/python" -c "from decoding import cpu_kernels as k; r = k.unavailable(); print('    ' + (r or 'ready'))" \
  || echo "    could not check it; decoding will use PyTorch's kernels"
echo "==> done. Activate with: source $VENV/bin/activate"
