#!/usr/bin/env bash
# Calls 2-5 (carry .carry/teacher/pN): keep teacher piece N outside the repository copy; report the runs.
set -euo pipefail
source training/device/common.sh
n=$1
cp -r ".carry/teacher/p$n" "$W/teacher/"
ls -la "$W/teacher"/*
status
