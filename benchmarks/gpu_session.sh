#!/usr/bin/env bash
# One H200 session, phase by phase (each phase is one device call on the same warm machine; benchmarks/NOTES.md):
#   bash benchmarks/gpu_session.sh carry N [KIT]   # after carrying .stage/KIT/pN (scripts/stage_wheels.py stage; KIT gpu)
#   bash benchmarks/gpu_session.sh safety-fits     # issue 16: join the safety-model kit, start the classifier's fits
#                                                  # at once (five parts x encoder.SEEDS or SAFETY_SEEDS), wait
#   bash benchmarks/gpu_session.sh safety-wait     # wait for them (a later call), then collect: $OUT/fit/
#                                                  # FIT_PARTS="1 2 3 4" (safety-fits and safety-wait): fit only these
#                                                  # parts and bring back their part files ($OUT/fit/), for a
#                                                  # budget that cannot hold all five; a later session carries them
#                                                  # (FIT_FROM=.stage/fit-X, carry=[".stage/fit-X"]) to safety-fits
#   bash benchmarks/gpu_session.sh carry-fit FILE...  # after carrying FILE (a piece of a part file that came back
#                                                  # cut, FILE.part.aa...): into /tmp/fit-from, one piece a call
#                                                  # beside the tree; FIT_FROM=/tmp/fit-from joins the pieces
#   bash benchmarks/gpu_session.sh safety-seeds    # fold 1 with four seeds at once: $OUT/seeds.tgz (safety_seeds.py)
#                                                  # SEED_RECIPES="32:1 128:2": seed 0 at each batch:lr-scale instead
#                                                  # ("128:2:bf16": under bf16 autocast, in b128bf16/)
#                                                  # SEED_DATA=FILE: fit on that safety_prompts.json (FITS_WAIT=0: start only)
#   bash benchmarks/gpu_session.sh safety-curve    # fold 1 on fractions of its training bases at once: $OUT/curve.tgz
#                                                  # (safety_learning_curve.py; CURVE_DATA / CURVE_BATCHES: the labelled
#                                                  # set and its batches to fit on; CURVE_RUNS="fraction:seed:order ...")
#   bash benchmarks/gpu_session.sh setup       # join the parts, `make setup GPU=1 WHEELS=/tmp/wheels`, gpu_check
#   bash benchmarks/gpu_session.sh prepare     # SD-1.5-shaped ort-cuda fp16 build in /tmp/tkbuild + pipeline timings
#   bash benchmarks/gpu_session.sh served [TREE]   # issue 12: benchmarks/gpu_served.py (TREE: a checkout to run it from)
#   bash benchmarks/gpu_session.sh edits       # issues 14 + 15: gpu_lora.py, gpu_tiles.py
#   bash benchmarks/gpu_session.sh lora        # issue 14 alone: gpu_lora.py
#   bash benchmarks/gpu_session.sh qwen        # issue 17: gpu_qwen.py
# Results: $OUT/<phase>.tgz (the JSON files) and the tables on stdout.
set -uo pipefail
# The image has jax/flax built for numpy 2; diffusers/transformers would import them next to the venv's numpy 1.26.
export USE_FLAX=0 USE_JAX=0 USE_TF=0
phase=$1; shift
OUT=${OUT:-/tmp/out}; BUILD=${BUILD:-/tmp/tkbuild}; RES=/tmp/res/$phase
mkdir -p "$OUT" "$RES"
pack() { tar czf "$OUT/$phase.tgz" -C "$RES" . 2>/dev/null; ls -la "$RES" | tail -n +2; }
# The fits run in their own process sessions (setsid), so they outlive a call while the machine stays warm.
FIT=/tmp/fit
# wait_for PATTERN LOG...: until no process's command line holds PATTERN (at most FITS_WAIT s), then the logs'
# last lines; fails while one still runs (a later call waits again).
wait_for() {
  local pattern=$1; shift
  local until=$(( $(date +%s) + ${FITS_WAIT:-540} ))
  while pgrep -f -- "$pattern" > /dev/null && [ "$(date +%s)" -lt "$until" ]; do sleep 10; done
  for log in "$@"; do echo "== $log"; grep -v Warn "$log" | tail -3; done
  ! pgrep -f -- "$pattern" > /dev/null
}
wait_fits() { wait_for "--fit-part" $FIT/part-*.log; }
ALL_PARTS="final 1 2 3 4"
# bring DIR FILE...: copy the files into $OUT/DIR; one over 12 MiB (a call returns files of 16 MiB at most: a
# rank-64 adapter or part file is 21 MB) comes back cut into FILE.part.aa, .ab, ... (`cat FILE.part.* > FILE` here).
# 12, not 15: a piece carried back (carry-fit) beside the tracked tree (52 MB on round 19's data) stays under 64 MiB.
bring() {
  local dir="$OUT/$1"; shift; mkdir -p "$dir"
  for f in "$@"; do
    if [ "$(stat -c %s "$f")" -gt $((12 * 1024 * 1024)) ]; then split -b 12M "$f" "$dir/$(basename "$f").part."
    else cp "$f" "$dir/"; fi
  done
}
collect_fits() {
  if [ "${FIT_PARTS:-$ALL_PARTS}" != "$ALL_PARTS" ]; then
    # Some parts only: their part files (safety_oof.<part>.seed<seed>.npz, 5.4 MB each at rank 16, 21 MB at 64)
    # and the logs come back (a call returns 8 files of 16 MiB at most: four folds tarred together were 21 MB); a
    # later safety-fits with FIT_FROM starts from them (train._one_fit finds a part file of the same data and settings).
    mkdir -p "$OUT/fit"
    tar czf "$OUT/fit/logs.tgz" -C $FIT $(cd $FIT && ls part-*.log)
    bring fit $FIT/safety_oof.*.seed*.npz
    return
  fi
  # Nothing left to fit: this run soups each part's fits, scores the held-out quarters with the fold soups (on the
  # GPU, seconds) and writes the final soup and its record.
  python3 scripts/safety_model.py --base mpnet --fits-only --seeds "$(safety_seeds)" --out $FIT \
    --oof-cache $FIT/safety_oof.npz 2>&1 | tail -3
  # Four files come back (a call returns a few files only): the fits' own scores are in safety_oof.npz (oof_seeds).
  mkdir -p "$OUT/fit"
  tar czf "$OUT/fit/logs.tgz" -C $FIT $(cd $FIT && ls part-*.log)
  bring fit $FIT/safety_adapter.safetensors $FIT/safety_fit.json $FIT/safety_oof.npz
}
safety_env() { export TOONARK_SAFETY_BASES=/tmp/bases PYTHONPATH=/tmp/site:.; }
# The fits each model is the soup of: SAFETY_SEEDS (e.g. "0,1"), else encoder.SEEDS.
safety_seeds() { echo "${SAFETY_SEEDS:-$(python3 -c "from toonark.prompt_safety import encoder; print(*encoder.SEEDS, sep=',')")}"; }
join_safety_kit() {
  python3 scripts/stage_wheels.py join --parts /tmp/parts/p* --out /tmp/wheels --site /tmp/site > /dev/null || return 3
  safety_env
  python3 -c "from toonark.prompt_safety import encoder; encoder.MPNet().folder()" || return 3   # joined once
}
case "$phase" in
  carry)
    mkdir -p /tmp/parts && cp -r ".stage/${2:-gpu}/p$1" /tmp/parts/ && du -sh "/tmp/parts/p$1" ;;
  carry-fit)
    # A 21 MB part file beside the tracked tree (51-53 MB since round 18's 21 MB adapter) passes a call's 64 MiB, so it is
    # carried as the pieces `bring` cut it into, one a call (carry=[".stage/fit-X/FILE.part.aa"]).
    mkdir -p /tmp/fit-from && cp "$@" /tmp/fit-from/ && ls -la /tmp/fit-from | tail -n +2 ;;
  safety-fits)
    join_safety_kit || exit 3
    mkdir -p $FIT
    # Part files fitted in an earlier session (FIT_PARTS), carried as FIT_FROM (a folder of the checkout, e.g.
    # .stage/fit-round15): a part whose file holds this data's fit loads it and fits nothing.
    if [ -n "${FIT_FROM:-}" ]; then
      for first in "$FIT_FROM"/*.npz.part.aa; do   # pieces carried by carry-fit: joined back into the part file
        [ -e "$first" ] && { cat "${first%.aa}".* > "$FIT/$(basename "${first%.part.aa}")" || exit 3; }
      done
      cp "$FIT_FROM"/safety_oof.*.seed*.npz $FIT/ 2>/dev/null
      ls $FIT/safety_oof.*.seed*.npz > /dev/null || { echo "no part file in $FIT_FROM"; exit 3; }
    fi
    seeds=$(safety_seeds)
    for part in ${FIT_PARTS:-$ALL_PARTS}; do
      for seed in ${seeds//,/ }; do
        setsid sh -c "start=\$(date +%s); python3 scripts/safety_model.py --base mpnet --fits-only --fit-part $part \
          --seeds $seeds --seed $seed --out $FIT --oof-cache $FIT/safety_oof.npz; echo \"rc \$? after \$(( \$(date +%s) - start )) s\"" \
          > $FIT/part-$part-seed$seed.log 2>&1 < /dev/null &
      done
    done
    wait_fits && collect_fits ;;
  safety-seeds)
    # benchmarks/safety_seeds.py: fold 1 fitted with seeds 0-3 at once (370 s on an H200), its held-out scores back.
    # SEED_RECIPES="32:1 128:2" (batch:learning-rate scale): fold 1 with seed 0 at each recipe instead, in b<batch>/.
    join_safety_kit || exit 3
    if [ -n "${SEED_RECIPES:-}" ]; then
      # batch:lr-scale[:options] -> a folder b<batch><options>/ and its fit's options; options: comma-separated
      # flags or key=value ("bf16", "rank=64,epochs=5" -> --rank 64 --epochs 5, in b256rank64epochs5/; "seed=1":
      # that seed instead of 0)
      runs=$(for r in $SEED_RECIPES; do IFS=: read -r b scale extra <<< "$r"
        seed=0; opts=""
        for o in ${extra//,/ }; do case $o in seed=*) seed=${o#seed=} ;; *) opts="$opts --${o/=/ }" ;; esac; done
        echo "b$b${extra//[=,]/}:$seed:--batch $b --lr-scale $scale$opts${SEED_DATA:+ --data $SEED_DATA}"; done)
    else
      runs=$(for seed in 0 1 2 3; do echo "s$seed:$seed:"; done)
    fi
    # Started once: a later call (the fits outlive it while the machine stays warm) waits for them again.
    if ! pgrep -f "safety_seeds.py fit" > /dev/null && ! ls /tmp/seeds/*/fit.log > /dev/null 2>&1; then
      while IFS=: read -r name seed recipe; do
        mkdir -p /tmp/seeds/$name
        setsid sh -c "start=\$(date +%s); python3 benchmarks/safety_seeds.py fit --seed $seed --out /tmp/seeds/$name $recipe; \
          echo \"rc \$? after \$(( \$(date +%s) - start )) s\"" > /tmp/seeds/$name/fit.log 2>&1 < /dev/null &
      done <<< "$runs"
    fi
    wait_for "safety_seeds.py fit" /tmp/seeds/*/fit.log; finished=$?
    tar czf /tmp/seeds.tgz -C /tmp/seeds $(cd /tmp/seeds && ls */fit.log */recipe.json */safety_oof.1.seed*.npz 2>/dev/null)
    bring . /tmp/seeds.tgz      # cut in parts when over 12 MiB (four rank-64 fits: ~80 MB)
    exit $finished ;;
  safety-curve)
    # benchmarks/safety_learning_curve.py: its RUNS (fraction, seed, order) at once; a later call with FITS_WAIT waits again.
    join_safety_kit || exit 3
    mkdir -p /tmp/curve
    if ! pgrep -f "safety_learning_curve.py fit" > /dev/null && ! ls /tmp/curve/*.npz > /dev/null 2>&1; then
      runs=${CURVE_RUNS:-$(python3 -c "from benchmarks.safety_learning_curve import RUNS; print(*(f'{f}:{s}:{o}' for f, s, o in RUNS))")}
      for run in $runs; do
        IFS=: read -r fraction seed order <<< "$run"
        setsid sh -c "start=\$(date +%s); python3 benchmarks/safety_learning_curve.py fit --fraction $fraction --seed $seed \
          --order $order --out /tmp/curve ${CURVE_DATA:+--data $CURVE_DATA} ${CURVE_BATCHES:+--batches $CURVE_BATCHES}; \
          echo \"rc \$? after \$(( \$(date +%s) - start )) s\"" > /tmp/curve/$order-f$fraction-s$seed.log 2>&1 < /dev/null &
      done
    fi
    wait_for "safety_learning_curve.py fit" /tmp/curve/*.log; finished=$?
    tar czf "$OUT/curve.tgz" -C /tmp/curve $(cd /tmp/curve && ls *.log *.npz 2>/dev/null)
    exit $finished ;;
  safety-wait)
    safety_env
    wait_fits && collect_fits ;;
  setup)
    python3 scripts/stage_wheels.py join --parts /tmp/parts/p* --out /tmp/wheels || exit 3
    make setup GPU=1 WHEELS=/tmp/wheels > "$RES/setup.log" 2>&1; rc=$?
    tail -15 "$RES/setup.log"; cp .venv/gpu-check.json "$RES/" 2>/dev/null
    [ -f build/tiny-pipeline/model_index.json ] || .venv/bin/python scripts/tiny.py --out build/tiny-pipeline > /dev/null
    pack; exit $rc ;;
  prepare)
    OUT=$RES BUILD=$BUILD bash benchmarks/triton_gpu.sh prepare 2>&1 | tail -25; pack ;;
  served)
    . benchmarks/device_env.sh > /dev/null
    tree=${1:-.}
    [ "$tree" = . ] || python3 -m pip install -q --no-deps --no-build-isolation -e "$tree" > /dev/null
    # SERVED_ARGS: more gpu_served.py options (e.g. --configs batched,single --idle-unload 3)
    (cd "$tree" && timeout ${SERVED_TIMEOUT:-420} python3 benchmarks/gpu_served.py --build "$BUILD" --out "$RES" \
       ${SERVED_ARGS:-}) 2>&1 \
      | grep -v "^  \|Warning" | tail -60
    [ "$tree" = . ] || python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null
    pack ;;
  lora)
    . benchmarks/device_env.sh > /dev/null
    timeout ${LORA_TIMEOUT:-240} python3 benchmarks/gpu_lora.py --build "$BUILD" --out "$RES" 2>&1 | tail -25
    pack ;;
  edits)
    . benchmarks/device_env.sh > /dev/null
    timeout ${LORA_TIMEOUT:-240} python3 benchmarks/gpu_lora.py --build "$BUILD" --out "$RES/lora" 2>&1 | tail -25
    timeout ${TILES_TIMEOUT:-240} python3 benchmarks/gpu_tiles.py --build "$BUILD" --out "$RES/tiles" 2>&1 | tail -25
    pack ;;
  qwen)
    . benchmarks/device_env.sh > /dev/null
    timeout ${QWEN_TIMEOUT:-300} python3 benchmarks/gpu_qwen.py --out "$RES/torch" --no-ort 2>&1 | tail -25
    timeout ${QWEN_ORT_TIMEOUT:-240} python3 benchmarks/gpu_qwen.py --out "$RES/ort" --dtypes fp16 --compile-dtypes "" 2>&1 | tail -25
    pack ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
