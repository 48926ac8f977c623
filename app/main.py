"""tinyscope: the Streamlit entry point. It only routes; pages live in app/pages/.

Run with ``streamlit run app/main.py`` (the README's start command does this).
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (file, title, url path); every page reads its state from the URL, so links open it directly
PAGES = [
    ("pages/overview.py", "Models", "overview"),
    ("pages/neuron.py", "Neuron", "neuron"),
    ("pages/heads.py", "Heads", "heads"),
    ("pages/head.py", "Head", "head"),
    ("pages/lab.py", "Lab", "lab"),
    ("pages/retrieval.py", "Retrieval", "retrieval"),
    ("pages/rules.py", "Rules", "rules"),
    ("pages/story.py", "Rule matches", "story"),
]


def run() -> None:
    st.set_page_config(page_title="tinyscope", layout="wide")
    pages = [st.Page(f, title=t, url_path=u, default=(i == 0)) for i, (f, t, u) in enumerate(PAGES)]
    st.navigation(pages).run()


run()
