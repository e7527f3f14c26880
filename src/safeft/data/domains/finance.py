"""Everyday finance arithmetic: interest, percentages, margins, budgets, break-even, yields.

Numbers are chosen so the gold answer is round or has at most two decimals, which keeps the task
learnable for a small model while leaving the arithmetic real.
"""

from __future__ import annotations

import random

from safeft.data.domains.base import DOMAINS, Item, NumericDomain, fmt, money, plural

_ITEMS = (
    "jacket",
    "bicycle",
    "laptop",
    "sofa",
    "pair of shoes",
    "lamp",
    "backpack",
    "kettle",
    "desk",
    "tent",
)
_BUSINESSES = ("shop", "bakery", "cafe", "bookshop", "small startup", "florist", "food truck", "gym")
_SUBJECTS = (
    "a share price",
    "the monthly rent",
    "a product's price",
    "a laptop's price",
    "a concert ticket's price",
)


def simple_interest(rng: random.Random) -> Item:
    principal = rng.randrange(500, 20001, 500)
    rate = rng.randint(1, 12)
    years = rng.randint(1, 10)
    interest = principal * rate * years / 100
    template = rng.choice(
        (
            "What is the simple interest on ${p} at {r}% per year for {t}?",
            (
                "You deposit ${p} in an account paying {r}% simple interest a year. How much interest do "
                "you earn in {t}?"
            ),
            "A loan of ${p} charges {r}% simple annual interest. How much interest is owed after {t}?",
            "Find the simple interest earned by ${p} invested for {t} at an annual rate of {r}%.",
            "Simple interest: principal ${p}, rate {r}% a year, time {t}. What is the interest?",
        )
    )
    prompt = template.format(p=principal, r=rate, t=plural(years, "year"))
    working = f"Interest = {principal} * {rate}/100 * {years} = {money(interest)}."
    return Item("simple_interest", prompt, working, money(interest))


def percent_change(rng: random.Random) -> Item:
    old = rng.randrange(20, 2001, 20)
    up = rng.random() < 0.5
    pct = rng.choice((5, 10, 15, 20, 25, 30, 40, 50, 60, 75) if up else (5, 10, 15, 20, 25, 30, 40, 50))
    # old is a multiple of 20 and pct of 5, so the change is a whole number of dollars.
    diff = old * pct // 100
    new = old + diff if up else old - diff
    direction = "increase" if up else "decrease"
    moved = "rose" if up else "fell"
    subject = rng.choice(_SUBJECTS)
    template = rng.choice(
        (
            "{S} {moved} from ${o} to ${n}. What is the percentage {d}?",
            "If {s} goes from ${o} to ${n}, what is the percent {d}?",
            "Calculate the percentage {d} when {s} changes from ${o} to ${n}.",
            "{S} was ${o} last year and is ${n} now. By what percent did it {d}?",
        )
    )
    prompt = template.format(S=subject[0].upper() + subject[1:], s=subject, moved=moved, o=old, n=new, d=direction)
    first, second = (new, old) if up else (old, new)
    working = f"Change = {first} - {second} = {diff}; {diff}/{old} * 100 = {pct}%."
    return Item("percent_change", prompt, working, str(pct))


def profit_margin(rng: random.Random) -> Item:
    revenue = rng.randrange(1000, 50001, 1000)
    margin = rng.choice((5, 10, 15, 20, 25, 30, 35, 40, 50))
    cost = revenue * (100 - margin) // 100
    template = rng.choice(
        (
            "A {b} has revenue of ${r} and costs of ${c}. What is its profit margin in percent?",
            "Revenue is ${r} and total costs are ${c}. Find the profit margin as a percentage of revenue.",
            "A {b} sold ${r} worth of goods and spent ${c}. What percent of revenue is profit?",
            "With sales of ${r} and expenses of ${c}, what is the {b}'s profit margin?",
        )
    )
    prompt = template.format(b=rng.choice(_BUSINESSES), r=revenue, c=cost)
    working = f"Profit = {revenue} - {cost} = {revenue - cost}; {revenue - cost}/{revenue} * 100 = {margin}%."
    return Item("profit_margin", prompt, working, str(margin))


def unit_profit(rng: random.Random) -> Item:
    units = rng.randrange(10, 501, 10)
    cost = rng.randint(2, 60)
    price = cost + rng.randint(1, 40)
    profit = units * (price - cost)
    template = rng.choice(
        (
            "A {b} sells {u} items at ${p} each, and each item costs ${c} to make. What is the total profit?",
            "Each item costs ${c} and sells for ${p}. What is the profit on {u} items?",
            "A {b} buys goods at ${c} per unit and sells them at ${p}. How much profit do {u} sales bring?",
            "Find the total profit from selling {u} units priced at ${p} with a unit cost of ${c}.",
        )
    )
    prompt = template.format(b=rng.choice(_BUSINESSES), u=units, p=price, c=cost)
    working = f"Profit per item = {price} - {cost} = {price - cost}; {price - cost} * {units} = {profit}."
    return Item("unit_profit", prompt, working, str(profit))


def tip(rng: random.Random) -> Item:
    bill = rng.randrange(20, 501, 10)
    pct = rng.choice((10, 15, 18, 20, 25))
    amount = bill * pct / 100
    meal = rng.choice(("dinner", "lunch", "breakfast", "meal"))
    template = rng.choice(
        (
            "Your {m} bill is ${b}. How much is a {t}% tip?",
            "What is a {t}% tip on a ${b} {m}?",
            "A {m} costs ${b} and you want to leave {t}%. How much tip should you leave?",
            "Calculate a {t}% tip for a {m} bill of ${b}.",
        )
    )
    prompt = template.format(m=meal, b=bill, t=pct)
    working = f"Tip = {bill} * {pct}/100 = {money(amount)}."
    return Item("tip", prompt, working, money(amount))


def discount(rng: random.Random) -> Item:
    price = rng.randrange(20, 1001, 10)
    pct = rng.choice((10, 15, 20, 25, 30, 40, 50))
    off = price * pct / 100
    template = rng.choice(
        (
            "A {i} costs ${p} and is on sale for {d}% off. What is the sale price?",
            "What do you pay for a ${p} {i} with a {d}% discount?",
            "A store takes {d}% off a ${p} {i}. What is the new price?",
            "Find the price of a {i} originally ${p} after a {d}% discount.",
        )
    )
    prompt = template.format(i=rng.choice(_ITEMS), p=price, d=pct)
    working = f"Discount = {price} * {pct}/100 = {money(off)}; {price} - {money(off)} = {money(price - off)}."
    return Item("discount", prompt, working, money(price - off))


def sales_tax(rng: random.Random) -> Item:
    price = rng.randrange(10, 1001, 10)
    rate = rng.choice((5, 6, 7, 8, 10))
    tax = price * rate / 100
    template = rng.choice(
        (
            "A {i} costs ${p} before tax. With {t}% sales tax, what is the total?",
            "What is the total cost of a ${p} {i} if sales tax is {t}%?",
            "You buy a {i} for ${p} plus {t}% sales tax. How much do you pay in total?",
            "Add {t}% sales tax to a {i} priced at ${p}. What is the final price?",
        )
    )
    prompt = template.format(i=rng.choice(_ITEMS), p=price, t=rate)
    working = f"Tax = {price} * {rate}/100 = {money(tax)}; {price} + {money(tax)} = {money(price + tax)}."
    return Item("sales_tax", prompt, working, money(price + tax))


def budget(rng: random.Random) -> Item:
    rent = rng.randrange(600, 2001, 50)
    food = rng.randrange(200, 801, 50)
    travel = rng.randrange(50, 401, 25)
    # Pick what is left first so it is always positive and round.
    left = rng.randrange(100, 3001, 50)
    income = rent + food + travel + left
    template = rng.choice(
        (
            (
                "Someone earns ${i} a month and spends ${r} on rent, ${f} on food and ${t} on transport. "
                "How much is left?"
            ),
            (
                "Monthly income: ${i}. Expenses: rent ${r}, groceries ${f}, transport ${t}. What remains "
                "at the end of the month?"
            ),
            (
                "A monthly budget starts at ${i}. After ${r} for rent, ${f} for food and ${t} for travel, "
                "how much money is left over?"
            ),
            (
                "Take-home pay is ${i} per month. Rent is ${r}, food is ${f} and transport is ${t}. How "
                "much can be saved?"
            ),
        )
    )
    prompt = template.format(i=income, r=rent, f=food, t=travel)
    working = f"{income} - {rent} - {food} - {travel} = {left}."
    return Item("budget", prompt, working, str(left))


def break_even(rng: random.Random) -> Item:
    margin = rng.choice((2, 4, 5, 8, 10, 20, 25, 40, 50))
    units = rng.randrange(50, 2001, 50)
    variable = rng.randint(2, 60)
    price = variable + margin
    fixed = margin * units
    template = rng.choice(
        (
            (
                "A product sells for ${p} and costs ${v} per unit to make. Fixed costs are ${f}. How many "
                "units must be sold to break even?"
            ),
            (
                "Fixed costs are ${f}, the price is ${p} per unit and the variable cost is ${v} per unit. "
                "Find the break-even quantity."
            ),
            (
                "How many units must a company sell to cover ${f} of fixed costs if each unit sells for "
                "${p} and costs ${v}?"
            ),
            "Break-even point: fixed costs ${f}, unit price ${p}, unit variable cost ${v}. How many units?",
        )
    )
    prompt = template.format(p=price, v=variable, f=fixed)
    working = f"Margin per unit = {price} - {variable} = {margin}; {fixed} / {margin} = {units}."
    return Item("break_even", prompt, working, str(units))


def dividend_yield(rng: random.Random) -> Item:
    share = rng.randrange(10, 501, 10)
    pct = rng.randint(1, 8)
    dividend = share * pct / 100
    template = rng.choice(
        (
            (
                "A stock trades at ${s} and pays an annual dividend of ${d} per share. What is its "
                "dividend yield in percent?"
            ),
            "What is the dividend yield of a share priced at ${s} that pays ${d} a year in dividends?",
            ("A company pays ${d} per share in yearly dividends and its shares cost ${s}. Find the dividend yield."),
            "Share price ${s}, annual dividend ${d}. What is the dividend yield as a percentage?",
        )
    )
    prompt = template.format(s=share, d=money(dividend))
    working = f"Yield = {money(dividend)} / {share} * 100 = {fmt(pct)}%."
    return Item("dividend_yield", prompt, working, str(pct))


@DOMAINS.register("finance")
class Finance(NumericDomain):
    """Everyday finance word problems with a single numeric answer (1% tolerance)."""

    name = "finance"
    rel_tol = 0.01
    tasks = (
        simple_interest,
        percent_change,
        profit_margin,
        unit_profit,
        tip,
        discount,
        sales_tax,
        budget,
        break_even,
        dividend_yield,
    )
