"""A seeded generator of realistic synthetic catalogues: drugs, treatment items, designated institutions.

Owns synthetic data only. Drug names are composed the way real generic names are (salt + active ingredient + release
form + dosage form: 盐酸二甲双胍缓释片, 阿莫西林胶囊, 布洛芬缓释胶囊 …) from real ingredients, so search and ranking
meet realistic text, including names with 多音字 (长春西汀: 长 cháng/zhǎng; 重组人胰岛素: 重 chóng/zhòng). Codes follow
the shape of the national 医保药品编码 (X/Z + ATC prefix + sequence parts, 23 characters), 批准文号 the shape of
国药准字H/Z…; manufacturers and institutions are invented names. The same seed always gives the same catalogue.
Never imported by production code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from protocol.catalogue import (
    ChargeCategory,
    DesignatedInstitution,
    DispensingClass,
    DrugEntry,
    InstitutionLevel,
    InstitutionType,
    TreatmentItem,
)

# (active ingredient, salts it is sold as, ATC prefix, forms it comes in, OTC?)
_INGREDIENTS: list[tuple[str, tuple[str, ...], str, tuple[str, ...], bool]] = [
    ("阿莫西林", ("",), "J01CA", ("胶囊", "片", "颗粒", "分散片"), False),
    ("阿莫西林克拉维酸钾", ("",), "J01CR", ("片", "颗粒"), False),
    ("布洛芬", ("",), "M01AE", ("缓释胶囊", "片", "颗粒", "混悬液"), True),
    ("二甲双胍", ("盐酸",), "A10BA", ("片", "缓释片", "肠溶片"), False),
    ("氨氯地平", ("苯磺酸", "马来酸"), "C08CA", ("片",), False),
    ("阿托伐他汀钙", ("",), "C10AA", ("片", "胶囊"), False),
    ("瑞舒伐他汀钙", ("",), "C10AA", ("片",), False),
    ("辛伐他汀", ("",), "C10AA", ("片", "胶囊"), False),
    ("头孢克肟", ("",), "J01DD", ("胶囊", "片", "颗粒", "分散片"), False),
    ("头孢呋辛酯", ("",), "J01DC", ("片", "胶囊"), False),
    ("左氧氟沙星", ("盐酸", "乳酸", ""), "J01MA", ("片", "胶囊", "注射液"), False),
    ("阿奇霉素", ("",), "J01FA", ("片", "胶囊", "颗粒", "分散片"), False),
    ("奥美拉唑", ("",), "A02BC", ("肠溶胶囊", "肠溶片"), False),
    ("雷贝拉唑钠", ("",), "A02BC", ("肠溶片", "肠溶胶囊"), False),
    ("硝苯地平", ("",), "C08CA", ("缓释片", "控释片", "片"), False),
    ("格列齐特", ("",), "A10BB", ("缓释片", "片"), False),
    ("格列美脲", ("",), "A10BB", ("片",), False),
    ("厄贝沙坦", ("",), "C09CA", ("片", "胶囊"), False),
    ("缬沙坦", ("",), "C09CA", ("胶囊", "片"), False),
    ("美托洛尔", ("酒石酸", "琥珀酸"), "C07AB", ("片", "缓释片"), False),
    ("氯雷他定", ("",), "R06AX", ("片", "胶囊", "糖浆"), True),
    ("西替利嗪", ("盐酸",), "R06AE", ("片", "滴剂"), True),
    ("对乙酰氨基酚", ("",), "N02BE", ("片", "缓释片", "混悬滴剂", "颗粒"), True),
    ("蒙脱石", ("",), "A07BC", ("散", "混悬液"), True),
    ("复方甘草", ("",), "R05DA", ("片", "口服溶液"), False),
    ("右美沙芬", ("氢溴酸",), "R05DA", ("片", "糖浆", "颗粒"), True),
    ("氨溴索", ("盐酸",), "R05CB", ("片", "口服溶液", "缓释胶囊"), True),
    ("长春西汀", ("",), "N06BX", ("片", "注射液"), False),
    ("重组人胰岛素", ("",), "A10AB", ("注射液",), False),
    ("甘精胰岛素", ("",), "A10AE", ("注射液",), False),
    ("地西泮", ("",), "N05BA", ("片", "注射液"), False),
    ("艾司唑仑", ("",), "N05CD", ("片",), False),
    ("曲马多", ("盐酸",), "N02AX", ("缓释片", "胶囊"), False),
    ("氯沙坦钾", ("",), "C09CA", ("片",), False),
    ("阿司匹林", ("",), "B01AC", ("肠溶片",), True),
    ("氯吡格雷", ("硫酸",), "B01AC", ("片",), False),
    ("华法林钠", ("",), "B01AA", ("片",), False),
    ("多潘立酮", ("",), "A03FA", ("片", "混悬液"), True),
    ("维生素C", ("",), "A11GA", ("片", "泡腾片"), True),
    ("碳酸钙D3", ("",), "A12AX", ("片", "颗粒"), True),
    ("左甲状腺素钠", ("",), "H03AA", ("片",), False),
    ("甲硝唑", ("",), "J01XD", ("片", "注射液"), False),
    ("莫匹罗星", ("",), "D06AX", ("软膏",), False),
    ("红霉素", ("",), "D06AX", ("软膏", "眼膏", "肠溶片"), True),
    ("妥布霉素", ("",), "S01AA", ("滴眼液",), False),
    ("玻璃酸钠", ("",), "S01XA", ("滴眼液",), False),
    ("沙丁胺醇", ("硫酸",), "R03AC", ("气雾剂", "片"), False),
    ("孟鲁司特钠", ("",), "R03DC", ("片", "咀嚼片", "颗粒"), False),
    ("坦索罗辛", ("盐酸",), "G04CA", ("缓释胶囊",), False),
    ("非那雄胺", ("",), "G04CB", ("片",), False),
    ("黄体酮", ("",), "G03DA", ("胶囊", "注射液"), False),
    ("雌二醇", ("戊酸",), "G03CA", ("片",), False),
]
# TCM patent medicines (中成药): codes start with Z.
_TCM: list[tuple[str, tuple[str, ...], bool]] = [
    ("连花清瘟", ("胶囊", "颗粒", "片"), False),
    ("板蓝根", ("颗粒",), True),
    ("藿香正气", ("水", "口服液", "软胶囊", "滴丸"), True),
    ("复方丹参", ("滴丸", "片"), True),
    ("银杏叶", ("片", "胶囊", "滴丸"), False),
    ("六味地黄", ("丸", "胶囊"), True),
    ("感冒灵", ("颗粒", "胶囊"), True),
    ("蒲地蓝消炎", ("片", "口服液"), True),
    ("小柴胡", ("颗粒", "片"), True),
    ("双黄连", ("口服液", "颗粒", "片"), True),
    ("血塞通", ("软胶囊", "片", "注射液"), False),
    ("安宫牛黄", ("丸",), False),
    ("乌鸡白凤", ("丸",), True),
    ("参苓白术", ("散", "颗粒"), True),
    ("牛黄解毒", ("片", "丸"), True),
]
_HOMOLOGOUS_HERBS = ["花椒", "八角茴香", "黑芝麻", "大枣", "山药", "枸杞子", "菊花", "薄荷"]

_FORM_OF: dict[str, tuple[str, str, str]] = {
    # name suffix -> (剂型, package pattern {n}, sale unit)
    "片": ("片剂", "{n}片/盒", "盒"),
    "缓释片": ("缓释片", "{n}片/盒", "盒"),
    "控释片": ("控释片", "{n}片/盒", "盒"),
    "肠溶片": ("肠溶片", "{n}片/盒", "盒"),
    "分散片": ("分散片", "{n}片/盒", "盒"),
    "咀嚼片": ("咀嚼片", "{n}片/盒", "盒"),
    "泡腾片": ("泡腾片", "{n}片/盒", "盒"),
    "胶囊": ("胶囊剂", "{n}粒/盒", "盒"),
    "缓释胶囊": ("缓释胶囊", "{n}粒/盒", "盒"),
    "肠溶胶囊": ("肠溶胶囊", "{n}粒/盒", "盒"),
    "软胶囊": ("软胶囊", "{n}粒/盒", "盒"),
    "颗粒": ("颗粒剂", "{n}袋/盒", "盒"),
    "散": ("散剂", "{n}袋/盒", "盒"),
    "混悬液": ("混悬剂", "100ml/瓶", "瓶"),
    "混悬滴剂": ("混悬剂", "15ml/瓶", "瓶"),
    "滴剂": ("滴剂", "10ml/瓶", "瓶"),
    "口服溶液": ("口服溶液剂", "100ml/瓶", "瓶"),
    "口服液": ("合剂", "{n}支/盒", "盒"),
    "糖浆": ("糖浆剂", "100ml/瓶", "瓶"),
    "水": ("酊剂", "{n}支/盒", "盒"),
    "注射液": ("注射剂", "{n}支/盒", "盒"),
    "软膏": ("软膏剂", "10g/支", "支"),
    "眼膏": ("眼膏剂", "2.5g/支", "支"),
    "滴眼液": ("滴眼剂", "5ml/支", "支"),
    "气雾剂": ("气雾剂", "200揿/瓶", "瓶"),
    "滴丸": ("滴丸剂", "{n}丸/盒", "盒"),
    "丸": ("丸剂", "{n}丸/盒", "盒"),
}
_SPECS = ["0.1g", "0.125g", "0.25g", "0.5g", "5mg", "10mg", "20mg", "40mg", "2.5mg", "1mg", "50mg", "0.2g", "75mg"]

_PROVINCES = ["江苏", "浙江", "山东", "广东", "四川", "河北", "湖北", "上海", "北京", "吉林", "天津", "重庆"]
_BRAND_PARTS = [
    "恒",
    "康",
    "华",
    "润",
    "济",
    "民",
    "仁",
    "和",
    "瑞",
    "德",
    "信",
    "永",
    "安",
    "正",
    "泰",
    "方",
    "鑫",
    "源",
]
_TRADE_SUFFIXES = ["林", "宁", "欣", "达", "舒", "乐", "平", "通", "灵", "康", "泰", "安"]
_COMPANY_SUFFIXES = ["制药有限公司", "药业股份有限公司", "医药集团有限公司", "药业有限公司", "制药厂"]

# 医保区划 around Kunshan (Suzhou districts and county-level cities).
REGIONS: dict[str, str] = {
    "320583": "昆山市",
    "320505": "苏州市虎丘区",
    "320506": "苏州市吴中区",
    "320507": "苏州市相城区",
    "320508": "苏州市姑苏区",
    "320509": "苏州市吴江区",
    "320581": "常熟市",
    "320582": "张家港市",
    "320585": "太仓市",
}
_TOWNS = ["玉山", "周市", "陆家", "花桥", "张浦", "千灯", "淀山湖", "锦溪", "周庄", "巴城", "开发区", "高新区"]
_ROADS = ["前进", "人民", "长江", "黄河", "朝阳", "萧林", "同丰", "马鞍山", "震川", "柏庐", "青阳", "珠江"]
_PHARMACY_BRANDS = ["老百姓", "同仁堂", "雷允上", "益丰", "国大", "百佳惠", "全亿健康", "瑞康", "济民", "华润堂"]

_TREATMENT_GROUPS: list[tuple[str, str, list[str]]] = [
    ("11", "次", ["普通门诊诊查费", "副主任医师诊查费", "主任医师诊查费", "急诊监护费", "院前急救费", "会诊费"]),
    ("12", "次", ["静脉注射", "肌肉注射", "皮下注射", "静脉输液", "雾化吸入", "换药", "导尿", "吸氧"]),
    ("25", "项", ["血常规", "尿常规", "大便常规", "肝功能", "肾功能", "血糖测定", "血脂四项", "糖化血红蛋白"]),
    ("21", "次", ["胸部正位片", "腹部彩超", "心电图", "头颅CT平扫", "腰椎磁共振", "甲状腺彩超", "动态心电图"]),
    ("33", "次", ["清创缝合", "脓肿切开引流", "拔牙", "关节腔穿刺", "胃镜检查", "肠镜检查"]),
    ("43", "次", ["针刺", "灸法", "推拿治疗", "拔罐", "中药熏洗", "穴位贴敷"]),
]


@dataclass(frozen=True)
class SyntheticCatalogue:
    drugs: list[DrugEntry]
    treatments: list[TreatmentItem]
    institutions: list[DesignatedInstitution]


def _manufacturers(rng: random.Random, count: int) -> list[str]:
    names: set[str] = set()
    while len(names) < count:
        brand = rng.choice(_BRAND_PARTS) + rng.choice(_BRAND_PARTS)
        names.add(f"{rng.choice(_PROVINCES)}{brand}{rng.choice(_COMPANY_SUFFIXES)}")
    return sorted(names)


def _generic_names(rng: random.Random) -> list[tuple[str, str, str, bool, bool]]:
    """(generic name, name suffix/form key, ATC-ish prefix, otc, tcm) for every composable generic product."""
    out: list[tuple[str, str, str, bool, bool]] = []
    for ingredient, salts, atc, forms, otc in _INGREDIENTS:
        for salt in salts:
            for form in forms:
                out.append((f"{salt}{ingredient}{form}", form, "X" + atc, otc, False))
    for name, forms, otc in _TCM:
        for form in forms:
            out.append((f"{name}{form}", form, "ZA04B", otc, True))
    rng.shuffle(out)
    return out


def generate_drugs(count: int, *, seed: int = 0) -> list[DrugEntry]:
    """`count` distinct drug products (plus a few 药食同源 herbs when count allows), deterministic for a seed."""
    rng = random.Random(seed)  # noqa: S311 - reproducible synthetic catalogue, not secrets
    generics = _generic_names(rng)
    makers = _manufacturers(rng, 400)
    drugs: list[DrugEntry] = []
    herbs = _HOMOLOGOUS_HERBS[: max(0, min(len(_HOMOLOGOUS_HERBS), count // 1000))]
    for h, herb in enumerate(herbs):
        drugs.append(
            DrugEntry(
                code=f"T000{h:02d}0000000000000001",
                name=f"{herb}（饮片）",
                generic_name=herb,
                dosage_form="饮片",
                specification="净制",
                package="1000g/袋",
                unit="克",
                manufacturer=rng.choice(makers),
                approval_number="无",
                category=ChargeCategory.CLASS_C,
                dispensing=DispensingClass.OTC_B,
                price_fen=rng.randrange(5, 80),
                homologous_herb=True,
            )
        )
    used: set[str] = set()
    i = 0
    while len(drugs) < count:
        g_index = i % len(generics)
        generic, form, atc, otc, tcm = generics[g_index]
        round_ = i // len(generics)
        i += 1
        maker_index = rng.randrange(len(makers))
        spec_index = rng.randrange(len(_SPECS))
        code = f"{atc}A{g_index:03d}A{round_ % 1000:03d}{spec_index:04d}{maker_index:05d}"
        if code in used:
            continue
        used.add(code)
        dosage_form, package, unit = _FORM_OF[form]
        n = rng.choice((6, 10, 12, 14, 20, 24, 28, 30, 36, 48))
        otc_class = DispensingClass.OTC_A if rng.random() < 0.5 else DispensingClass.OTC_B
        # About half the products carry a trade name (商品名), as in the real list: many more distinct names to search.
        trade = ""
        if rng.random() < 0.5:
            trade = f"（{rng.choice(_BRAND_PARTS)}{rng.choice(_BRAND_PARTS)}{rng.choice(_TRADE_SUFFIXES)}）"
        drugs.append(
            DrugEntry(
                code=code,
                name=f"{generic}{trade}",
                generic_name=generic,
                dosage_form=dosage_form,
                specification="1g" if tcm else _SPECS[spec_index],
                package=package.format(n=n),
                unit=unit,
                manufacturer=makers[maker_index],
                approval_number=f"国药准字{'Z' if tcm else 'H'}{rng.randrange(19_000_000, 20_260_000):08d}",
                category=rng.choices(list(ChargeCategory), weights=(5, 4, 1))[0],
                dispensing=otc_class if otc else DispensingClass.RX,
                price_fen=rng.randrange(150, 30_000),
                limit_note="限二级及以上医疗机构" if rng.random() < 0.05 else "",
            )
        )
    return drugs


def generate_treatments(count: int, *, seed: int = 0) -> list[TreatmentItem]:
    rng = random.Random(seed + 1)  # noqa: S311 - reproducible synthetic catalogue, not secrets
    items: list[TreatmentItem] = []
    variants = ["", "（儿童）", "（加收）", "（床旁）", "（夜间）"]
    for i in range(count):
        prefix, unit, names = _TREATMENT_GROUPS[i % len(_TREATMENT_GROUPS)]
        base = names[(i // len(_TREATMENT_GROUPS)) % len(names)]
        variant = variants[(i // (len(_TREATMENT_GROUPS) * len(names))) % len(variants)]
        items.append(
            TreatmentItem(
                code=f"{prefix}{i:07d}",
                name=f"{base}{variant}",
                unit=unit,
                category=rng.choices(list(ChargeCategory), weights=(6, 3, 1))[0],
                price_fen=rng.randrange(100, 200_000),
                connotation="含材料费" if rng.random() < 0.2 else "",
            )
        )
    return items


def generate_institutions(count: int, *, seed: int = 0) -> list[DesignatedInstitution]:
    rng = random.Random(seed + 2)  # noqa: S311 - reproducible synthetic catalogue, not secrets
    regions = sorted(REGIONS)
    out: list[DesignatedInstitution] = []
    for i in range(count):
        region = regions[i % len(regions)]
        town = rng.choice(_TOWNS)
        roll = rng.random()
        if roll < 0.6:
            kind, letter, level = InstitutionType.PHARMACY, "P", InstitutionLevel.UNRATED
            name = f"{rng.choice(_PHARMACY_BRANDS)}大药房（{town}{i:04d}店）"
        elif roll < 0.75:
            kind, letter = InstitutionType.HOSPITAL, "H"
            level = rng.choice([InstitutionLevel.GRADE_3, InstitutionLevel.GRADE_2])
            hospital = rng.choice(["第一人民医院", "中医医院", "妇幼保健院", "第二人民医院"])
            name = f"{REGIONS[region]}{hospital}{town}分院{i}"
        elif roll < 0.9:
            kind, letter, level = InstitutionType.CLINIC, "H", InstitutionLevel.GRADE_1
            name = f"{town}社区卫生服务中心{i}"
        else:
            kind, letter, level = InstitutionType.OUTPATIENT, "H", InstitutionLevel.UNRATED
            name = f"{town}{rng.choice(['康复', '口腔', '中医'])}门诊部{i}"
        out.append(
            DesignatedInstitution(
                code=f"{letter}{region}{i:05d}",
                name=name,
                institution_type=kind,
                level=level,
                region_code=region,
                address=f"江苏省{REGIONS[region]}{town}{rng.choice(_ROADS)}路{rng.randrange(1, 999)}号",
            )
        )
    return out


def generate_catalogue(
    *, seed: int = 0, drugs: int = 20_000, treatments: int = 600, institutions: int = 500
) -> SyntheticCatalogue:
    return SyntheticCatalogue(
        drugs=generate_drugs(drugs, seed=seed),
        treatments=generate_treatments(treatments, seed=seed),
        institutions=generate_institutions(institutions, seed=seed),
    )
