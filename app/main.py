"""tinyscope: the Streamlit entry point. It only routes; pages live in app/views/.

Run with ``streamlit run app/main.py`` (the README's start command does this).
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (file, title, url path); every page reads its state from the URL, so links open it directly
PAGES = [
    ("views/overview.py", "Models", "overview"),
    ("views/neuron.py", "Neuron", "neuron"),
    ("views/heads.py", "Heads", "heads"),
    ("views/head.py", "Head", "head"),
    ("views/lab.py", "Lab", "lab"),
    ("views/retrieval.py", "Retrieval", "retrieval"),
    ("views/rules.py", "Rules", "rules"),
    ("views/story.py", "Rule matches", "story"),
    ("views/ground_truth.py", "Ground truth", "ground_truth"),
]


def run() -> None:
    st.set_page_config(page_title="tinyscope", layout="wide")
    pages = [st.Page(f, title=t, url_path=u, default=(i == 0)) for i, (f, t, u) in enumerate(PAGES)]
    st.navigation(pages).run()


run()
