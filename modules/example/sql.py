SQL_USER = """
SELECT name, email
FROM users
WHERE name = %(name)s
"""
