"""C-NMC leukemia workbench dashboard: `streamlit run streamlit_app.py` (or `make run`)."""
import streamlit as st

from dashboard import auth
from dashboard.settings import RESEARCH_BANNER


def main() -> None:
    st.set_page_config(page_title="C-NMC leukemia workbench", page_icon=":material/biotech:", layout="wide")
    refused = auth.auth_mode().mode == "refused"  # an unsafe configuration: one error, nothing else on the page
    if not refused:
        st.warning(RESEARCH_BANNER, icon=":material/warning:")
    gate = auth.gate_page()  # refused, or sign-in configured: the sign-in page until signed in, with a role
    if gate is not None:
        title = "Not served" if refused else "Sign in"
        st.navigation([st.Page(gate, title=title, default=True)], position="hidden").run()
        return
    auth.sidebar_ui(auth.current_actor())
    pages = [
        st.Page("pages/classify.py", title="Classify", icon=":material/biotech:", default=True),
        st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
        st.Page("pages/evaluate.py", title="Evaluate", icon=":material/monitoring:"),
        st.Page("pages/misclassified.py", title="Misclassified", icon=":material/image_search:"),
        st.Page("pages/data.py", title="Data", icon=":material/dataset:"),
    ]
    st.navigation(pages).run()


main()
