# Sourced by train.sh and test.sh: create the venv if missing and install the project into it.
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# torchvision (for timm and the architecture tests) exists on this platform only for torch 2.14.1
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[lab,test]'
