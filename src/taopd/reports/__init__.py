"""Reading run folders back: the plots and offline HTML page (`report`), its token view
(`token_view`), its tables (`html_tables`) and assets (`templates/`).

May import `taopd.core`, `errors` and the foundation modules; not `training` (the two are
independent) nor anything above.
"""
