"""C-NMC leukemia workbench dashboard: `streamlit run streamlit_app.py` (or `make run`)."""
import streamlit as st

from dashboard.settings import RESEARCH_BANNER


def main() -> None:
    st.set_page_config(page_title="C-NMC leukemia workbench", page_icon="🔬", layout="wide")
    st.warning(RESEARCH_BANNER, icon="⚠️")
    pages = [
        st.Page("pages/classify.py", title="Classify", icon="🔬", default=True),
        st.Page("pages/train.py", title="Train", icon="🏋️"),
        st.Page("pages/evaluate.py", title="Evaluate", icon="📊"),
        st.Page("pages/misclassified.py", title="Misclassified", icon="🔍"),
        st.Page("pages/data.py", title="Data", icon="🗂️"),
    ]
    st.navigation(pages).run()


main()
