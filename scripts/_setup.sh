# Sourced by test.sh and demo.sh: create .venv and install torch without pulling a CUDA build
# where the machine offers a CPU one. One place, so the two README commands set up alike.
#
#   SED_DASK_TORCH_INDEX=URL   take torch from that index, e.g. PyTorch's CPU-only wheels:
#                              https://download.pytorch.org/whl/cpu   (Linux; macOS wheels are CPU already)
#   SED_DASK_TORCH_INDEX=      (unset) plain `pip install torch==<pin>`: a CPU wheel the machine carries
#                              (pip's find-links) wins; on Linux with only PyPI that is a CUDA build.
# A torch already in .venv is kept whatever its version (another version's pin is dropped from the
# constraints, so pip does not replace it); tests/test_deploy.py then says if it differs from the image's pin.

sed_dask_venv() {
    python3 -m venv .venv
    . .venv/bin/activate
}

sed_dask_torch_pin() {
    sed -n 's/^torch==\([^[:space:]#]*\).*/\1/p' deploy/constraints.txt
}

# Print the constraints file pip should use (deploy/constraints.txt, or a copy without torch).
sed_dask_install_torch() {
    local pin have
    pin="$(sed_dask_torch_pin)"
    if have="$(python -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
        echo "using the torch already installed in .venv: $have (pinned: $pin)" >&2
        if [ "${have%%+*}" = "$pin" ]; then echo deploy/constraints.txt; return; fi
        local c=.venv/constraints-keep-torch.txt
        grep -v '^torch==' deploy/constraints.txt > "$c"
        echo "$c"
        return
    fi
    if [ -n "${SED_DASK_TORCH_INDEX:-}" ]; then
        echo "installing torch==$pin from $SED_DASK_TORCH_INDEX" >&2
        python -m pip install -q --index-url "$SED_DASK_TORCH_INDEX" "torch==$pin" >&2
    else
        echo "installing torch==$pin (set SED_DASK_TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build on Linux)" >&2
        python -m pip install -q "torch==$pin" >&2
    fi
    echo deploy/constraints.txt
}
