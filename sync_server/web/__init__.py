"""Server-rendered web pages (Jinja2 templates + a little CSS) for operators.

Pages read through the same queries and schemas as the JSON API; they must never write, and never show personal
data. Labels are zh-CN with English in small text; elements carry stable ids, classes and data-* attributes for
browser tests.
"""
