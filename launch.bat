@echo off
rem Double-click wrapper: start OneCard Studio.
cd /d "%~dp0"
python launch.py %*
pause
