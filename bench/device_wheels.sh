# Sourced by bench/device_batch.sh and bench/device_quality.sh: install the carried wheels (.devcarry/whl, this
# Python's tags) into $SITE once per machine; a marker file lets later calls skip the carry.
install_wheels() {
  [ -f $SITE/.installed ] && return 0
  [ -d .devcarry/whl ] || { echo "carry .devcarry/whl (no wheels installed on this machine yet)"; return 2; }
  local tag files
  tag=$(python3 -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
  files=$(ls .devcarry/whl/*.whl | grep -E -- "-($tag-|py3-none|py2.py3-none|cp3[0-9]+-abi3)")
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE $files \
    || { echo "wheel install failed"; return 2; }
  touch $SITE/.installed
}
